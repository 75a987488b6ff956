"""The IPA plugin against the real Ironic Python Agent (13.x).

Our manager and extension are loaded by IPA's own stevedore plugin loading from the entry
points setup.cfg declares, and driven through IPA's own ``dispatch_to_managers`` with
``node`` and ``image_info`` shaped as Ironic sends them, against a real ``mcastdeploy
send`` on loopback multicast, onto a loop device.

Three things of IPA's are patched, all below the plugin:
- the device listing: IPA lists only lsblk TYPE ``disk``, and a loop device is TYPE
  ``loop``, so the listing of disks is the listing of loop devices; a root device hint
  (``instance_info.root_device.name``, as an operator sets it) then makes IPA's own
  ``get_os_install_device`` pick ours among them;
- the generic manager's ``initialize``: it loads IPMI kernel modules, assembles md RAID
  and starts multipathd, on the host running the tests;
- its check that no process holds the disk before wiping it: fuser here cannot read
  PID 1's open files (a sandbox), which IPA takes for "busy" until it gives up.  The loop
  device is the test's own and nothing else opens it.
Where IPA would download over HTTP, its standby extension's ``prepare_image`` is a mock:
that is the boundary the fallback tests assert was reached.
"""

from __future__ import annotations

import base64
import configparser
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from unittest import mock

import pytest

from helpers import finish, mcastdeploy

pytest.importorskip("ironic_python_agent", reason="ironic-python-agent is a test extra")

from ironic_python_agent import config as _ipa_config  # noqa: E402,F401  (IPA's options)
from ironic_python_agent import disk_utils, errors, hardware  # noqa: E402
from oslo_config import cfg  # noqa: E402
from ironic_python_agent.extensions import base as ext_base  # noqa: E402
from ironic_python_agent.extensions import standby  # noqa: E402

from mcastdeploy.ipa import job as ipa_job  # noqa: E402  (state inspected and reset)
from mcastdeploy.spec import new_session  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("losetup", "sgdisk", "parted", "partprobe", "udevadm", "wipefs", "mkfs.ext2")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(tool) is None for tool in TOOLS),
    reason=f"loop devices need root; IPA's disk handling needs {', '.join(TOOLS)} "
           "(tools/apt-packages.txt)")

IMAGE_SIZE = 8 * 1024 * 1024
#: IPA puts the config drive in the disk's last 64 MiB, past the image.
DISK_SIZE = 80 * 1024 * 1024
SECTOR = 512
PARTITION_START = 2048  # sectors


# --- IPA with our plugins, as the agent loads them ----------------------------------------

@pytest.fixture
def agent(tmp_path_factory, monkeypatch):
    """IPA's plugin state, fresh: managers and extensions loaded by stevedore from this
    checkout's setup.cfg entry points (a dist-info put first on sys.path, so the test sees
    what setup.cfg says, not what was pip-installed last)."""
    site = tmp_path_factory.mktemp("site")
    dist = site / "mcastdeploy-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mcastdeploy\nVersion: 0.1.0\n")
    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, "setup.cfg"))
    with open(dist / "entry_points.txt", "w") as handle:
        for group, lines in setup["options.entry_points"].items():
            handle.write(f"[{group}]\n{lines.strip()}\n\n")
    monkeypatch.syspath_prepend(str(site))

    real_listing = hardware.list_all_block_devices

    def loop_devices_as_disks(block_type="disk", *args, **kwargs):
        if block_type == "disk":
            block_type = "loop"
        return real_listing(block_type, *args, **kwargs)

    monkeypatch.setattr(hardware, "list_all_block_devices", loop_devices_as_disks)
    monkeypatch.setattr(hardware.GenericHardwareManager, "initialize", lambda self: None)
    monkeypatch.setattr(disk_utils, "wait_for_disk_to_become_available", lambda device: None)
    # Where IPA does download (a test's failure), it fails at once instead of retrying.
    cfg.CONF.set_override("image_download_connection_retries", 0)
    monkeypatch.setattr(hardware, "_global_managers", None)
    monkeypatch.setattr(hardware, "NODE", None)
    monkeypatch.setattr(ext_base, "_EXT_MANAGER", None)
    ipa_job.replace_current_job(None)

    class Agent(ext_base.ExecuteCommandMixin):
        """What IronicPythonAgent is to its extensions: the command runner."""

        def __init__(self) -> None:
            super().__init__()
            self.ext_mgr = ext_base.init_ext_manager(self)

        def force_heartbeat(self) -> None:  # async commands call it when they finish
            pass

    yield Agent()
    ipa_job.replace_current_job(None)
    cfg.CONF.clear_override("image_download_connection_retries")


@pytest.fixture
def loop_disk(tmp_path):
    """An 80 MiB loop device whose first 16 MiB hold garbage, with partition scanning
    (IPA finds the config drive partition it makes); detached afterwards."""
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as handle:
        handle.write(b"\xa5" * (16 * 1024 * 1024))
        handle.truncate(DISK_SIZE)
    device = subprocess.run(["losetup", "-f", "-P", "--show", str(backing)], check=True,
                            capture_output=True, text=True, timeout=30).stdout.strip()
    yield device
    subprocess.run(["losetup", "-d", device], timeout=30, check=False)


@pytest.fixture
def gpt_image(tmp_path):
    """An 8 MiB whole-disk image: a GPT and one partition of pseudo-random data.
    Returns its path and the partition's bytes (what must land on the disk)."""
    path = tmp_path / "image.raw"
    data = hashlib.shake_256(b"mcastdeploy ipa").digest(IMAGE_SIZE)
    path.write_bytes(data)
    subprocess.run(["sgdisk", "-n", f"1:{PARTITION_START}:0", "-t", "1:8300", str(path)],
                   check=True, capture_output=True, timeout=30)
    with open(path, "rb") as handle:
        handle.seek(PARTITION_START * SECTOR)
        partition = handle.read(IMAGE_SIZE - PARTITION_START * SECTOR - 34 * SECTOR)
    return path, partition


def config_drive(tmp_path) -> str:
    """A config drive as Ironic sends it: a filesystem labelled config-2, gzipped, base64.
    (ext2: IPA mounts the drive to check it, and this kernel has no iso9660 or vfat.)"""
    path = tmp_path / "configdrive.img"
    with open(path, "wb") as handle:
        handle.truncate(1024 * 1024)
    subprocess.run(["mkfs.ext2", "-q", "-F", "-L", "config-2", str(path)], check=True,
                   capture_output=True, timeout=30)
    return base64.b64encode(gzip.compress(path.read_bytes())).decode()


def ironic_node(device: str, spec: dict | None, *, deploying: bool = True) -> dict:
    """The node as the conductor passes it to a deploy step (node.as_dict(secure=True),
    the fields IPA and we read, and some it ignores), with a root device hint."""
    node_uuid = str(uuid.uuid4())
    instance_info = {
        "image_source": "5f1f5ecc-7fd2-4d02-bc1d-1cb9a0e8a0f1",
        "image_url": "http://192.0.2.1:8080/images/5f1f5ecc?temp_url_sig=******",
        "image_disk_format": "raw",
        "image_container_format": "bare",
        "image_os_hash_algo": "sha512",
        "root_gb": "10",
        "root_device": {"name": device},
        "capabilities": {},
    }
    if spec is not None:
        instance_info["mcastdeploy"] = spec
    driver_internal_info = {"is_whole_disk_image": True, "agent_url": "http://192.0.2.9:9999",
                            "agent_version": "13.0.0"}
    if deploying:  # the conductor's list for a plain deployment
        driver_internal_info["deploy_steps"] = [
            {"interface": "deploy", "step": step, "priority": priority, "args": {}}
            for step, priority in (("deploy", 100), ("write_image", 80),
                                   ("prepare_instance_boot", 60), ("tear_down_agent", 40),
                                   ("switch_to_tenant_network", 30), ("boot_instance", 20))]
    return {"uuid": node_uuid, "name": "rack1-node3", "driver": "ipmi",
            "provision_state": "deploying", "target_provision_state": "active",
            "properties": {"cpu_arch": "x86_64", "local_gb": "10", "memory_mb": "4096"},
            "instance_info": instance_info, "driver_internal_info": driver_internal_info}


def lookup_view(node: dict) -> dict:
    """The node as ``GET /v1/lookup`` returns it to the agent."""
    return {key: node[key] for key in ("uuid", "properties", "instance_info",
                                       "driver_internal_info")}


def ironic_image_info(node: dict, image: str, algorithm: str = "sha512") -> dict:
    """What the conductor's AgentDeploy.write_image sends for a whole-disk image."""
    with open(image, "rb") as handle:
        digest = hashlib.new(algorithm, handle.read()).hexdigest()
    return {"id": node["instance_info"]["image_source"],
            "urls": [node["instance_info"]["image_url"]],
            "disk_format": "raw", "container_format": "bare", "stream_raw_images": True,
            "os_hash_algo": algorithm, "os_hash_value": digest, "node_uuid": node["uuid"]}


def ironic_value(rate: int = 400_000_000, **options) -> tuple[dict, str]:
    """A session on lo as ``session new --ironic`` emits it, and that spec for the sender
    (with the rack head's interface)."""
    spec = new_session(interface="lo", rate_bps=rate)
    value = {"session": {key: item for key, item in json.loads(spec.to_json()).items()
                         if key != "interface"},
             "interface": "lo", **options}
    return value, spec.to_json()


def start_sender(tmp_path, spec_json: str, image) -> subprocess.Popen:
    path = tmp_path / "sender-session.json"
    path.write_text(spec_json)
    return mcastdeploy("send", "--session", str(path), "--min-receivers", "1", "--wait", "30",
                       "--linger", "1", "--json", str(image))


def our_manager():
    """Our manager as IPA loaded it (stevedore), not as imported by the test."""
    (ours,) = [manager for manager in hardware.get_managers()
               if type(manager).__name__ == "MulticastHardwareManager"]
    return ours


def mocked_http_path(monkeypatch) -> mock.Mock:
    """IPA's HTTP download: the standby extension's prepare_image, as the generic
    manager's write_image calls it."""
    prepare = mock.Mock(name="standby.prepare_image")
    prepare.return_value.wait.return_value = "IPA downloaded the image over HTTP"
    monkeypatch.setattr(standby.StandbyExtension, "prepare_image", prepare)
    return prepare


def check_partition_landed(device: str, partition: bytes) -> None:
    with open(device, "rb") as handle:
        handle.seek(PARTITION_START * SECTOR)
        assert handle.read(len(partition)) == partition


# --- the tests ----------------------------------------------------------------------------

def test_ipa_loads_our_plugins_from_the_entry_points(agent):
    ranked = [(type(manager).__name__, manager.evaluate_hardware_support())
              for manager in hardware.get_managers()]
    names = [name for name, _ in ranked]
    assert names.index("MulticastHardwareManager") < names.index("GenericHardwareManager")
    assert dict(ranked)["MulticastHardwareManager"] == hardware.HardwareSupport.MAINLINE
    assert "status" in agent.get_extension("mcastdeploy").command_map
    assert agent.execute_command("mcastdeploy.status").command_result == {"state": "idle"}


def test_write_image_over_multicast_onto_the_install_device(agent, tmp_path, loop_disk,
                                                            gpt_image):
    image, partition = gpt_image
    value, spec_json = ironic_value()
    node = ironic_node(loop_disk, value)
    image_info = ironic_image_info(node, str(image), "sha512")  # read back and checked
    configdrive = config_drive(tmp_path)
    hardware.cache_node(lookup_view(node))
    sender = start_sender(tmp_path, spec_json, image)
    try:
        result = hardware.dispatch_to_managers("write_image", node, [], image_info,
                                               configdrive=configdrive)
    finally:
        code, out, err = finish(sender, timeout=90)
    assert code == 0, err
    assert json.loads(out)["receivers_done"] == 1
    # IPA's own steps ran after ours: its result message, the config drive partition.
    assert result["result"].startswith(
        f"prepare_image: image ({image_info['id']}) written to device {loop_disk} ")
    check_partition_landed(loop_disk, partition)
    # IPA's config drive, added after our write as after its own download
    label = subprocess.run(["blkid", "-p", "-s", "LABEL", "-o", "value", f"{loop_disk}p2"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
    assert label == "config-2"
    status = agent.execute_command("mcastdeploy.status").command_result
    assert status["state"] == "done"
    assert status["blocks_done"] == status["blocks_total"] > 0
    assert status["bytes_done"] == status["bytes_total"] == IMAGE_SIZE
    # Ironic's URLs of the raw image were the straggler's last resort (unused here).
    assert ipa_job.current_job().origin == tuple(image_info["urls"])


def test_wrong_checksum_falls_back_to_ipas_download(agent, tmp_path, loop_disk, gpt_image,
                                                    monkeypatch, caplog):
    image, _ = gpt_image
    value, spec_json = ironic_value(timeout=5)
    node = ironic_node(loop_disk, value)
    image_info = ironic_image_info(node, str(image), "sha256")
    image_info["os_hash_value"] = "0" * 64  # Ironic deploys another image than is sent
    http = mocked_http_path(monkeypatch)
    hardware.cache_node(lookup_view(node))
    sender = start_sender(tmp_path, spec_json, image)
    started = time.monotonic()
    try:
        result = hardware.dispatch_to_managers("write_image", node, [], image_info)
    finally:
        sender.kill()
        finish(sender, timeout=30)
    assert result == "IPA downloaded the image over HTTP"
    http.assert_called_once_with(image_info=image_info, configdrive=None)
    assert time.monotonic() - started < 30
    assert "IPA downloads the image itself" in caplog.text


def test_blocked_group_raises_incompatible_in_bounded_time(agent, loop_disk, gpt_image):
    image, _ = gpt_image
    value, _ = ironic_value(timeout=3)  # and no sender ever sends
    node = ironic_node(loop_disk, json.dumps(value))  # stored as a JSON string, as it may be
    image_info = ironic_image_info(node, str(image))
    hardware.cache_node(lookup_view(node))
    started = time.monotonic()
    with pytest.raises(errors.IncompatibleHardwareMethodError, match="from the sender"):
        our_manager().write_image(node, [], image_info)
    assert time.monotonic() - started < 20


def test_a_malformed_spec_falls_back_and_says_why(agent, loop_disk, gpt_image, monkeypatch,
                                                  caplog):
    image, _ = gpt_image
    node = ironic_node(loop_disk, '{"session": {"group": "239.1.2.3"')
    image_info = ironic_image_info(node, str(image))
    http = mocked_http_path(monkeypatch)
    hardware.cache_node(lookup_view(node))
    assert hardware.dispatch_to_managers("write_image", node, [], image_info) \
        == "IPA downloaded the image over HTTP"
    http.assert_called_once_with(image_info=image_info, configdrive=None)
    assert "the session spec from Ironic is unusable: mcastdeploy is not valid JSON" \
        in caplog.text


def test_without_a_spec_ipa_writes_the_image_untouched(agent, loop_disk, gpt_image,
                                                       monkeypatch):
    image, _ = gpt_image
    node = ironic_node(loop_disk, None)
    image_info = ironic_image_info(node, str(image))
    http = mocked_http_path(monkeypatch)
    hardware.cache_node(lookup_view(node))
    assert hardware.dispatch_to_managers("write_image", node, [], image_info) \
        == "IPA downloaded the image over HTTP"
    http.assert_called_once_with(image_info=image_info, configdrive=None)
    assert ipa_job.current_job() is None
    assert agent.execute_command("mcastdeploy.status").command_result == {"state": "idle"}


@pytest.mark.parametrize("change", ["cleaning", "partition image", "no early_start",
                                    "a RAID step before write_image"])
def test_early_start_only_when_deploying_a_whole_disk_image(agent, loop_disk, change):
    value, _ = ironic_value(early_start=change != "no early_start")
    node = ironic_node(loop_disk, value, deploying=change != "cleaning")
    if change == "partition image":
        node["driver_internal_info"]["is_whole_disk_image"] = False
    if change == "a RAID step before write_image":  # from a deploy template
        node["driver_internal_info"]["deploy_steps"].append(
            {"interface": "raid", "step": "apply_configuration", "priority": 90,
             "args": {"raid_config": {"logical_disks": []}}})
    hardware.cache_node(lookup_view(node))
    assert ipa_job.current_job() is None


def test_early_start_receives_before_the_deploy_step(agent, tmp_path, loop_disk, gpt_image):
    image, partition = gpt_image
    # Slow enough (about 3 s) for the status command to see the transfer under way.
    value, spec_json = ironic_value(rate=20_000_000, early_start=True)
    node = ironic_node(loop_disk, value)
    image_info = ironic_image_info(node, str(image), "sha256")
    hardware.cache_node(lookup_view(node))  # what the agent does with lookup's answer
    early = ipa_job.current_job()
    assert early is not None and early.early
    sender = start_sender(tmp_path, spec_json, image)
    seen: list[dict] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = agent.execute_command("mcastdeploy.status").command_result
            seen.append(status)
            if status["state"] in ("done", "failed"):
                break
            time.sleep(0.1)
        assert seen[-1]["state"] == "done", seen[-1]
        # The deploy step comes once the image is there, as the conductor sends it: the
        # deploy extension's execute_deploy_step, which dispatches write_image.
        step = {"interface": "deploy", "step": "write_image",
                "args": {"image_info": image_info, "configdrive": None}}
        command = agent.execute_command("deploy.execute_deploy_step", step=step, node=node,
                                        ports=[]).join(timeout=60)
    finally:
        code, out, err = finish(sender, timeout=90)
    assert code == 0, err
    assert command.command_status == "SUCCEEDED", command.command_error
    assert json.loads(out)["receivers_done"] == 1  # received once, at lookup
    assert ipa_job.current_job() is early
    result = command.command_result["deploy_result"]
    assert result["result"].startswith(
        f"prepare_image: image ({image_info['id']}) written to device {loop_disk} ")
    check_partition_landed(loop_disk, partition)
    under_way = [s for s in seen if s["state"] == "receiving"
                 and 0 < s["blocks_done"] < s["blocks_total"]]
    assert under_way, [s["state"] for s in seen]
    assert all(s["rate_mb_s"] > 0 and s["eta_s"] is not None for s in under_way[1:])
    assert seen[-1]["device"] == loop_disk and seen[-1]["early_start"] is True


def test_the_agent_asks_the_rack_head_for_its_session(agent, tmp_path, loop_disk,
                                                      gpt_image):
    """No session in the node, only where to ask: the plugin asks the rack-head service
    (a real ``mcastdeploy serve``) for the Glance image, pinned by Ironic's SHA-256, and
    receives the session the service opens for it."""
    from test_serve import TOKEN, Daemon, free_port, write_config

    image, partition = gpt_image
    node = ironic_node(loop_disk, None)
    image_id = node["instance_info"]["image_source"]
    head = tmp_path / "head"
    (head / "images").mkdir(parents=True)
    shutil.copy(image, head / "images" / image_id)  # the rack head serves it by Glance id
    port = free_port()
    config = write_config(head, listen=f"127.0.0.1:{port}", interface="lo", rate="400M",
                          gather=0.5, linger=1.0)
    daemon = Daemon(head, config, f"http://127.0.0.1:{port}")
    try:
        node["instance_info"]["mcastdeploy"] = {"rack_head": daemon.url, "token": TOKEN,
                                                "interface": "lo"}
        image_info = ironic_image_info(node, str(image), "sha256")
        hardware.cache_node(lookup_view(node))
        result = hardware.dispatch_to_managers("write_image", node, [], image_info)
        assert result["result"].startswith(
            f"prepare_image: image ({image_id}) written to device {loop_disk} ")
        check_partition_landed(loop_disk, partition)
        log = daemon.text()
        assert "event=session_opened session=" in log
        assert f"image={image_id} " in log and f"agent={node['uuid']} " in log
        assert "ok=true" in log and "agents_done=1 agents=1" in log
    finally:
        daemon.stop()
