"""One process of a multi-process JAX cluster on this host (run by tests/test_multihost.py, one per process).

Joins the cluster over loopback, loads a converted checkpoint onto each global mesh (every process restores only
the shards its own devices hold), runs the forward on the same tokens and writes, for mesh i (in the order given),
`i.PROCESS.npy` (the logits gathered from all processes) and `i.PROCESS.json` (what this process saw and holds).
Set XLA_FLAGS (e.g. 4 host devices) before starting it.

    python tests/multihost_worker.py --process-id I --num-processes N --port PORT \
        --checkpoint DIR --tokens TOKENS.npy --out DIR dp2-ep4 expert=4,tensor=2
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from oss_jax.checkpoint import load
from oss_jax.model import forward
from oss_jax.sharding import make_mesh, parse_mesh

TIMEOUT_S = 30  # joining the cluster, missed heartbeats and shutdown: a lost peer fails fast instead of hanging


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--port", type=int, required=True, help="coordinator port on 127.0.0.1 (process 0 serves it)")
    p.add_argument("--checkpoint", type=Path, required=True, help="a converted (Orbax) checkpoint directory")
    p.add_argument("--tokens", type=Path, required=True, help=".npy of int tokens [B, T], the same for every process")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("meshes", nargs="+", help="mesh presets or inline specs, e.g. dp2-ep4 or expert=4,tensor=2")
    args = p.parse_args()

    address = f"127.0.0.1:{args.port}"
    jax.distributed.initialize(coordinator_address=address, num_processes=args.num_processes,
                               process_id=args.process_id, coordinator_bind_address=address,
                               initialization_timeout=TIMEOUT_S, heartbeat_timeout_seconds=TIMEOUT_S,
                               shutdown_timeout_seconds=TIMEOUT_S)

    tokens = np.load(args.tokens)
    for i, spec in enumerate(args.meshes):
        t0 = time.perf_counter()
        mesh = make_mesh(parse_mesh(spec))
        model = load(args.checkpoint, mesh=mesh)
        logits = multihost_utils.process_allgather(forward(model, tokens), tiled=True)  # [B, T, V] on every host
        np.save(args.out / f"{i}.{args.process_id}.npy", logits)
        experts = model.layers[0].moe.mlp1_kernel[...]  # [E, D, 2F]; a shard's index[0] slices E
        held = sorted({e for s in experts.addressable_shards for e in range(experts.shape[0])[s.index[0]]})
        grid = mesh.devices.reshape(-1, mesh.devices.shape[-1])
        report = {"process_count": jax.process_count(), "devices": jax.device_count(),
                  "local_devices": jax.local_device_count(), "experts_held": held,
                  "mesh_processes": [[d.process_index for d in row] for row in grid],
                  "seconds": time.perf_counter() - t0}
        (args.out / f"{i}.{args.process_id}.json").write_text(json.dumps(report))
    jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        os._exit(1)  # now: a normal exit would first wait out the distributed shutdown barrier for the lost peers
