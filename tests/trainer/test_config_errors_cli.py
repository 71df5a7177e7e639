"""Configuration errors from the model, the MoE layer, the routers and the mesh reach the user as
one `error: ...` line and exit status 2 from the entry points, never as a traceback."""

import pytest

from moe import train

pytestmark = pytest.mark.usefixtures("clean_gin")


QUICK = ["--gin_file=runs/quickstart.gin", "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=8"]


@pytest.mark.parametrize(
    "bindings,expected",
    [
        # 8 experts cannot be split over 3 expert partitions (MoE layer / partitioner).
        (["--gin.NUM_EXPERT_PARTITIONS=3"], "NUM_EXPERT_PARTITIONS"),
        # A router that looks at later tokens, in the causal decoder (router interface).
        (["--gin.decoder/SparseConfig.router=@decoder/ExpertChoice()"], "leaks the future"),
        # A model setting that cannot work (model config).
        (["--gin.TransformerConfig.num_heads=0"], "num_heads"),
    ],
)
def test_configuration_errors_exit_2_with_one_line(tmp_path, capsys, bindings, expected):
    code = train.main([*QUICK, f"--gin.MODEL_DIR='{tmp_path}'", *bindings])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and expected in err
    assert "Traceback" not in err
