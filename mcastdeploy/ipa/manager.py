"""The hardware manager IPA loads from the ``ironic_python_agent.hardware_managers`` entry
point: it takes the deploy step ``write_image`` when Ironic gave a session spec.

IPA asks its managers in order of ``evaluate_hardware_support()``; one that raises
IncompatibleHardwareMethodError passes the call to the next, more generic one.  This one
ranks MAINLINE, above IPA's generic manager (whose ``write_image`` downloads over HTTP) and
below a deployer's own SERVICE_PROVIDER managers.  So:

- no spec, a partition image, a checksum it cannot verify, or any failure of the
  multicast path: IncompatibleHardwareMethodError, and IPA's HTTP download runs;
- otherwise the image is received onto ``get_os_install_device()``, verified, and IPA
  carries on from there as after its own download (standby extension's prepare_image,
  which finds the image in place: partition table check, config drive, root UUID).

Early start: IPA calls ``wait_for_disks`` on its managers as soon as it caches a new node
from lookup; when the node's spec says ``early_start`` and the node is being deployed
(``driver_internal_info`` has its ``deploy_steps``) with a whole-disk image, and no step
but the ramdisk's boot comes before write_image, the receive starts there, in the
background, and the deploy step waits for it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NoReturn, Optional

from ironic_python_agent import config as _ipa_config  # noqa: F401  (registers IPA's options)
from ironic_python_agent import disk_utils, errors, hardware
from ironic_python_agent.extensions import base as ext_base
from oslo_config import cfg
from oslo_log import log

from mcastdeploy.ipa.checksum import (ChecksumError, check_written, ironic_checksum, is_raw,
                                      pin_session)
from mcastdeploy.ipa.ironic_spec import IronicSpec, find_ironic_spec
from mcastdeploy.ipa.job import JobStillRunning, ReceiveJob, current_job, replace_current_job
from mcastdeploy.spec import SessionSpec, SpecError

CONF = cfg.CONF
LOG = log.getLogger(__name__)
#: Beyond a job's own deadline, how long the deploy step waits for it to wind down.
WAIT_MARGIN = 60.0


class MulticastHardwareManager(hardware.HardwareManager):
    HARDWARE_MANAGER_NAME = "mcastdeploy"
    HARDWARE_MANAGER_VERSION = "1.0"

    def evaluate_hardware_support(self) -> int:
        return hardware.HardwareSupport.MAINLINE

    def wait_for_disks(self) -> NoReturn:
        """IPA's call right after it caches a new node: the early-start hook.  IPA's own
        wait for the disks then runs as ever (hence the exception)."""
        try:
            self._start_early(hardware.get_cached_node())
        except Exception:  # a failed early start must never stop the agent
            LOG.exception("mcastdeploy: could not start receiving early")
        raise errors.IncompatibleHardwareMethodError()

    def write_image(self, node: dict, ports: list, image_info: dict,
                    configdrive: Optional[str] = None) -> Any:
        try:
            ironic = find_ironic_spec(node, image_info)
        except SpecError as error:
            _decline(f"the session spec from Ironic is unusable: {error}")
        if ironic is None:
            raise errors.IncompatibleHardwareMethodError()  # not ours: IPA's path
        if image_info.get("image_type") == "partition":
            _decline("partition images are left to IPA (whole-disk images only)")
        device = hardware.dispatch_to_managers("get_os_install_device", permit_refresh=True)
        try:
            checksum = ironic_checksum(image_info, md5_allowed=CONF.md5_enabled)
            raw = is_raw(image_info)
            # A rack head is asked once: the session of a receive begun at lookup is the
            # one to finish (asking again could open a second session, once that one is
            # over, and receive the image twice).
            early = _early_job(device)
            asked = early.session if early is not None and ironic.rack_head else \
                ironic.session_for(image_info, node)
            session = pin_session(asked, checksum, raw)
        except ChecksumError as error:
            _decline(str(error))
        except SpecError as error:  # the rack head could not be asked, or refused
            _decline(f"no session for the image: {error}")
        # Ironic's own URLs of a raw image: what a straggler fetches when neither peers
        # nor the rack head's block server can serve (IPA's download, block by block).
        origin = [url for url in image_info.get("urls") or ()
                  if isinstance(url, str) and url.startswith(("http://", "https://"))] \
            if raw else []
        job = _job_for(ironic, session, device, node.get("uuid"), origin)
        outcome = job.wait(ironic.deadline + WAIT_MARGIN)
        if outcome is None:
            if not job.stop():  # IPA's download must not write beside it
                raise errors.DeploymentError("mcastdeploy: the receive overran its deadline "
                                             "and did not stop")
            _decline("the receive overran its deadline")
        if not outcome.ok or outcome.summary is None:
            _decline(f"the multicast receive failed: {outcome.reason}")
        if job.device != device:
            _decline(f"received onto {job.device}, but the install device is {device}")
        if raw:
            try:
                check_written(device, outcome.summary.bytes, outcome.summary.sha256, checksum)
            except ChecksumError as error:
                _decline(str(error))
        LOG.info("mcastdeploy: image %s received onto %s and verified (%.1f MB/s)",
                 image_info.get("id"), device, outcome.summary.mb_per_s)
        return _carry_on_as_ipa(image_info, device, configdrive)

    def _start_early(self, node: Optional[dict]) -> None:
        try:
            ironic = find_ironic_spec(node)
        except SpecError as error:
            LOG.warning("mcastdeploy: not starting early, the spec is unusable: %s", error)
            return
        if ironic is None or not ironic.early_start or node is None:
            return
        internal = node.get("driver_internal_info") or {}
        # Lookup also happens for cleaning and inspection: only a deployment of a
        # whole-disk image may have its disk written before the deploy step asks.
        if not internal.get("deploy_steps") or not internal.get("is_whole_disk_image"):
            LOG.info("mcastdeploy: node %s is not deploying a whole-disk image, not "
                     "receiving early", node.get("uuid"))
            return
        earlier = steps_before_write_image(internal["deploy_steps"])
        if earlier:
            LOG.info("mcastdeploy: node %s runs %s before write_image, which may change "
                     "the disk: not receiving early", node.get("uuid"), ", ".join(earlier))
            return
        try:
            session = ironic.session_for(None, node)
        except SpecError as error:
            LOG.warning("mcastdeploy: not receiving early: %s", error)
            return
        LOG.info("mcastdeploy: node %s: receiving session %s early", node.get("uuid"),
                 session.session_id)
        job = ReceiveJob(ironic, session, _wait_for_install_device,
                         _device_preparer(node.get("uuid")), early=True)
        replace_current_job(job)
        job.start()


def steps_before_write_image(deploy_steps: list) -> list[str]:
    """The deployment's steps that run before write_image, but for the one that boots
    this ramdisk (``deploy.deploy``): a RAID or BIOS step, say, from a deploy template.
    Any of them may rewrite, repartition or reboot onto the disk received early."""
    write = [step for step in deploy_steps if step.get("step") == "write_image"]
    bar = write[0].get("priority", 0) if write else 0
    return [f"{step.get('interface')}.{step.get('step')}" for step in deploy_steps
            if step.get("priority", 0) > bar
            and (step.get("interface"), step.get("step")) != ("deploy", "deploy")]


def _decline(reason: str) -> NoReturn:
    LOG.warning("mcastdeploy: IPA downloads the image itself: %s", reason)
    raise errors.IncompatibleHardwareMethodError(reason)


def _job_for(ironic: IronicSpec, session: SessionSpec, device: str,
             node_uuid: Optional[str], origin: list[str]) -> ReceiveJob:
    """The early job for this session and device if there is one that has not failed;
    else a new one (the sender may have come up since lookup)."""
    early = _early_job(device)
    if early is not None and early.session.session_id == session.session_id:
        LOG.info("mcastdeploy: the deploy step waits for the receive started at lookup")
        return early
    job = ReceiveJob(ironic, session, lambda: device, _device_preparer(node_uuid),
                     origin=origin)
    try:
        replace_current_job(job)
    except JobStillRunning as error:  # neither a second receive nor IPA's download now
        raise errors.DeploymentError(f"mcastdeploy: {error}") from None
    return job.start()


def _early_job(device: str) -> Optional[ReceiveJob]:
    """The receive begun at lookup, if it is for ``device`` and has not failed."""
    early = current_job()
    if early is not None and early.early and early.device in (None, device) and \
            not (early.finished and not (early.outcome and early.outcome.ok)):
        return early
    return None


def _device_preparer(node_uuid: Optional[str]) -> Callable[[str], None]:
    def prepare(device: str) -> None:
        # As IPA before writing a whole-disk image: old signatures beyond the new image
        # (a backup GPT at the disk's end, RAID superblocks) must not survive it.
        disk_utils.destroy_disk_metadata(device, node_uuid or "")
        disk_utils.udev_settle()
    return prepare


def _wait_for_install_device() -> str:
    """IPA's install device, waiting for it as IPA's wait_for_disks does (bounded by
    the same [DEFAULT]disk_wait_attempts and disk_wait_delay)."""
    attempts = max(CONF.disk_wait_attempts, 1)
    for attempt in range(attempts):
        try:
            return hardware.dispatch_to_managers("get_os_install_device")
        except errors.DeviceNotFound:
            if attempt + 1 == attempts:
                raise
            time.sleep(CONF.disk_wait_delay)
    raise AssertionError("unreachable")


def _carry_on_as_ipa(image_info: dict, device: str, configdrive: Optional[str]) -> Any:
    """What IPA does once its own download is on the disk, by IPA's own code."""
    # The end of standby._write_whole_disk_image and _write_image:
    disk_utils.trigger_device_rescan(device)
    try:
        disk_utils.fix_gpt_partition(device, node_uuid=None)
    except errors.DeploymentError:
        pass  # logged by IPA; IPA carries on too
    # prepare_image skips the download for the image it holds ("already cached") and does
    # the rest: partition table check, config drive, root UUID, the result message.
    standby = ext_base.get_extension("standby")
    standby.cached_image_id = image_info["id"]
    return standby.prepare_image(image_info=image_info, configdrive=configdrive).wait()
