"""One side of a transfer in its own process, so bench/reliability.py can SIGKILL it mid-stream.

python bench/_transfer_peer.py receiver TOKEN RID [RID ...]   -> prints its endpoint, serves 60 s
python bench/_transfer_peer.py sender ENDPOINT TOKEN NBYTES RID [RID ...] -> paced sends (seconds each)
"""

from __future__ import annotations

import sys
import time

import _common  # noqa: F401 -- puts the repository on sys.path
import numpy as np

from prfaas_plugin.faults.matrix import FINGERPRINT
from prfaas_plugin.transfer import GrpcTcpReceiver, GrpcTcpSender, ItemSpec, SenderConfig, TransferManifest


class Sink:
    """Receives into throwaway buffers: these benches check outcomes and leaks, not bytes."""

    def buffer_for(self, item: ItemSpec) -> memoryview:
        return memoryview(np.empty(item.nbytes, dtype=np.uint8))

    def item_done(self, item: ItemSpec) -> None:
        pass


def main() -> None:
    role = sys.argv[1]
    if role == "receiver":
        tok, rids = sys.argv[2], sys.argv[3:]
        rx = GrpcTcpReceiver()
        for rid in rids:
            rx.expect(rid, tok, FINGERPRINT, Sink(), deadline_s=60)
        print(rx.endpoint, flush=True)
        time.sleep(60)
    elif role == "sender":
        endpoint, tok, nbytes, rids = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
        tx = GrpcTcpSender(SenderConfig(chunk_bytes=64 << 10, connections=2, pacing_gbps=0.1))
        data = np.ones(nbytes, dtype=np.uint8)
        for rid in rids:
            h = tx.open(endpoint, TransferManifest(rid, (ItemSpec("big", nbytes),), FINGERPRINT), tok, deadline_s=60)
            h.send("big", data)
        print("sending", flush=True)
        time.sleep(60)


if __name__ == "__main__":
    main()
