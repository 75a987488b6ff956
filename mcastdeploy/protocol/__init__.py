"""Protocol state machines: sender and receiver logic with no I/O and no clock.

Drivers (sockets, the in-process lossy network, the simulator) feed them datagrams and the
time and carry out what they return, so every driver runs the very same protocol code.
"""

from mcastdeploy.protocol.geometry import ImageGeometry
from mcastdeploy.protocol.receiver import Receiver, ReceiverConfig, ReceiverPhase
from mcastdeploy.protocol.sender import Sender, SenderConfig, SenderState

__all__ = ["ImageGeometry", "Receiver", "ReceiverConfig", "ReceiverPhase", "Sender",
           "SenderConfig", "SenderState"]
