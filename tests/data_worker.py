"""One process of the two-process data test (tests/test_pipeline.py): real ``jax.distributed`` on
localhost with gloo CPU collectives. Reads its part of the train and eval splits with the default
process index/count (from JAX), builds a global array from its local batch, and writes JSON.

    python tests/data_worker.py PROCESS_ID PORT CONFIG_JSON OUT_JSON
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

GLOBAL_BATCH = 8


def main(process_id: int, port: int, cfg_json: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from vgg_jax import data

    cfg = data.default_data_config()
    cfg.update(json.loads(cfg_json))
    it = data.create_train_iterator(cfg, global_batch_size=GLOBAL_BATCH, seed=3)
    first_epoch: list[int] = []
    while len(first_epoch) < it.get_state()["layout"]["examples"]:
        batch = next(it)
        first_epoch += batch["index"].tolist()
    first_epoch = first_epoch[: it.get_state()["layout"]["examples"]]

    # The last local batch as one global array over both processes' devices.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    labels = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), batch["label"])
    gathered = multihost_utils.process_allgather(batch["label"])

    evaluated, batches = [], 0
    for b in data.create_eval_iterator(cfg, view="center", scale=cfg.eval_scales[0], global_batch_size=GLOBAL_BATCH):
        batches += 1
        evaluated += b["index"][b["valid"]].tolist()
        assert b["image"].shape[0] == GLOBAL_BATCH // 2
    with open(out, "w") as f:
        json.dump(
            dict(
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                first_epoch=first_epoch,
                global_labels_shape=list(labels.shape),
                gathered_labels=np.asarray(gathered).tolist(),
                local_labels=batch["label"].tolist(),
                eval_indices=evaluated,
                eval_batches=batches,
            ),
            f,
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
