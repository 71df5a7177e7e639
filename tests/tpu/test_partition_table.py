"""The TPU scripts' README partition table, checked by compiling for each slice.

For every row: the mesh the partitioner builds from the slice's real device list, and a MoE
layer's forward and backward compiled for that mesh, whose expert kernels the compiler takes
as [experts per device, ...] per chip, with the tokens moved by all-to-all.
"""

import math
import pathlib
import re

import jax.numpy as jnp
import pytest

from moe import hlo_collectives, tpu_topology
from moe.moe_layer import MoeLayer
from moe.partitioning import Partitioner
from moe.routing import TokenChoice
from tests.tpu.conftest import compile_layer_grad, requires_libtpu

pytestmark = requires_libtpu

README = pathlib.Path(__file__).resolve().parents[2] / "tpu_scripts" / "README.md"
D_MODEL, D_FF, LENGTH = 32, 128, 32


def _table_rows() -> list[dict]:
    section = README.read_text().split("## 4.")[1].split("## 5.")[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not cells[0].startswith("v4-"):
            continue
        devices, hosts = (int(x) for x in cells[1].split("/"))
        rows.append({
            "slice": cells[0], "devices": devices, "hosts": hosts, "experts": int(cells[2]),
            "expert_partitions": int(cells[3]), "model_partitions": int(cells[4]),
            "mesh": tuple(int(x) for x in re.findall(r"\d+", cells[5])),
            "experts_per_device": int(cells[6]), "batch_multiple": int(cells[7]),
        })
    return rows


ROWS = _table_rows()


def test_the_table_was_read():
    assert len(ROWS) >= 9 and {r["slice"] for r in ROWS} == {"v4-32", "v4-128"}


def _compile_moe_layer(row: dict, partitioner: Partitioner):
    layer = MoeLayer(num_experts=row["experts"], d_ff=D_FF, activation="relu",
                     router=TokenChoice(num_selected_experts=2), max_group_size=LENGTH,
                     num_expert_partitions=partitioner.num_expert_partitions,
                     dtype=jnp.bfloat16)
    return compile_layer_grad(layer, (row["batch_multiple"], LENGTH, D_MODEL), partitioner)


def _row_id(row: dict) -> str:
    return (f"{row['slice']}-E{row['experts']}-ep{row['expert_partitions']}"
            f"-mp{row['model_partitions']}")


@pytest.mark.parametrize("row", [pytest.param(r, id=_row_id(r)) for r in ROWS])
def test_readme_row_compiles_as_stated(row):
    tpu_slice = tpu_topology.parse_slice(row["slice"])
    assert (tpu_slice.chips, tpu_slice.hosts) == (row["devices"], row["hosts"])
    devices = tpu_topology.slice_devices(row["slice"])
    partitioner = Partitioner(row["expert_partitions"], row["model_partitions"],
                              devices=devices)
    assert tuple(partitioner.mesh.shape.values()) == row["mesh"]
    assert partitioner.num_batch_shards == row["batch_multiple"]
    params, compiled = _compile_moe_layer(row, partitioner)
    # What the compiled program takes per chip for each expert kernel [E, ...].
    kernels = params["params"]["expert"]
    for name, kernel in kernels.items():
        per_chip = kernel.sharding.shard_shape(kernel.shape)
        assert per_chip[0] == row["experts_per_device"], (name, per_chip)
        wide = per_chip[2] if name.startswith("wi") else per_chip[1]
        assert wide == D_FF // row["model_partitions"], (name, per_chip)
    in_param_shardings = compiled.input_shardings[0][0]["params"]["expert"]
    for name, sharding in in_param_shardings.items():
        assert sharding.shard_shape(kernels[name].shape)[0] == row["experts_per_device"]
    summary = hlo_collectives.summarize(hlo_collectives.collective_ops(compiled.as_text()))
    if partitioner.num_expert_partitions > 1:
        assert summary["all-to-all"]["count"] >= 2, summary
    assert math.prod(row["mesh"]) == row["devices"]
