"""Wire format: the bytes of every packet, kept apart from the behaviour that sends them."""

from mcastdeploy.wire.packets import (
    HEADER_SIZE,
    MAX_BLOCK_SYMBOLS,
    MAX_DATAGRAM,
    MAX_MANIFEST_HASHES,
    MAX_NACK_ENTRIES,
    MAX_SYMBOL_ID,
    Announce,
    Data,
    Done,
    End,
    Flags,
    Header,
    Manifest,
    Nack,
    Packet,
    PacketType,
    ReceiverState,
    RepairNotice,
    Status,
    WireError,
    encode,
    encode_data_header,
    parse,
    parse_body,
    parse_header,
)

__all__ = [
    "HEADER_SIZE", "MAX_BLOCK_SYMBOLS", "MAX_DATAGRAM", "MAX_MANIFEST_HASHES", "MAX_NACK_ENTRIES",
    "MAX_SYMBOL_ID", "Announce", "Data", "Done", "End", "Flags", "Header", "Manifest", "Nack", "Packet", "PacketType",
    "ReceiverState", "RepairNotice", "Status", "WireError", "encode", "encode_data_header", "parse",
    "parse_body", "parse_header",
]
