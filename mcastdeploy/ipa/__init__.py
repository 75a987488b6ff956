"""The Ironic Python Agent glue: mcastdeploy as a drop-in for IPA's image download.

- ironic_spec.py: the ``mcastdeploy`` value Ironic stores on a node, and where to find it.
- checksum.py: how the image Ironic names is verified once it is on disk.
- job.py: one receive onto the install device, in its own thread, with its progress.
- manager.py: the hardware manager (IPA entry point) that takes over ``write_image``.
- extension.py: the agent extension (IPA entry point) with the ``status`` command.

Only manager.py and extension.py import IPA; the rest serves the command line too.
"""
