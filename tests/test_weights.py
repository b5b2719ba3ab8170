"""The conversion core: key/shape validation, streaming writer, sharded loading."""

import json
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from edit_r1_jax import weights
from edit_r1_jax.parallel import rules
from devices import env as device_env


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Dict(kernel=rules.param(np.zeros((4, 6), np.float32), ("embed", "mlp")),
                             bias=rules.param(np.zeros((6,), np.float32), ("mlp",)))
        self.qkv = nnx.List([rules.param(np.zeros((4, 2), np.float32), ("embed", None)) for _ in range(3)])


def _abstract():
    return nnx.state(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))


RULES = [
    weights.Rule(r"proj\.weight", ("proj.kernel",)),
    weights.Rule(r"proj\.bias", ("proj.bias",), weights.COPY),
    weights.Rule(r"fused\.weight", ("qkv.0", "qkv.1", "qkv.2"), weights.split_rows(3)),
]


def _source(tmp_path, **override):
    rng = np.random.default_rng(0)
    t = {"proj.weight": rng.standard_normal((6, 4)).astype(np.float32),
         "proj.bias": rng.standard_normal((6,)).astype(np.float32),
         "fused.weight": rng.standard_normal((6, 4)).astype(np.float32)}
    t.update(override)
    t = {k: v for k, v in t.items() if v is not None}
    save_file(t, str(tmp_path / "model.safetensors"))
    return t


def test_convert_and_load_roundtrip(tmp_path):
    t = _source(tmp_path)
    weights.convert(weights.SafetensorsSource(tmp_path / "model.safetensors"), RULES, _abstract(),
                    tmp_path / "out", {"width": 4}, dtype=ml_dtypes.bfloat16)
    assert weights.read_config(tmp_path / "out") == {"width": 4}
    with safe_open(str(tmp_path / "out" / "params.safetensors"), "numpy") as f:
        assert f.get_tensor("proj.kernel").dtype == ml_dtypes.bfloat16
    state = weights.load_state(tmp_path / "out", _abstract())
    np.testing.assert_array_equal(np.asarray(state["proj"]["kernel"].get_value()),
                                  t["proj.weight"].T.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(state["qkv"][1].get_value()),
                                  t["fused.weight"][2:4].T.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_convert_reports_every_problem_and_writes_nothing(tmp_path):
    _source(tmp_path, **{"proj.bias": None, "extra.weight": np.zeros((2,), np.float32),
                         "proj.weight": np.zeros((6, 5), np.float32)})
    with pytest.raises(weights.ConversionError) as e:
        weights.convert(weights.SafetensorsSource(tmp_path / "model.safetensors"), RULES, _abstract(),
                        tmp_path / "out", {})
    msg = str(e.value)
    assert "proj.bias" in msg and "missing" in msg
    assert "extra.weight" in msg and "unexpected" in msg
    assert "proj.weight [6, 5]" in msg and "shape mismatch" in msg
    assert not (tmp_path / "out").exists()


def test_sharded_source_index(tmp_path):
    a = {"proj.weight": np.ones((6, 4), np.float32), "proj.bias": np.ones((6,), np.float32)}
    b = {"fused.weight": np.ones((6, 4), np.float32)}
    save_file(a, str(tmp_path / "m-1.safetensors"))
    save_file(b, str(tmp_path / "m-2.safetensors"))
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"proj.weight": "m-1.safetensors", "proj.bias": "m-1.safetensors",
                        "fused.weight": "m-2.safetensors"}}))
    src = weights.SafetensorsSource(tmp_path)
    assert sorted(src.keys()) == ["fused.weight", "proj.bias", "proj.weight"]
    assert src.file_of("fused.weight").name == "m-2.safetensors"


def test_sharded_load_reads_only_local_slices(tmp_path):
    """On 8 host devices each device holds a slice, and the values are the file's."""
    _source(tmp_path)
    weights.convert(weights.SafetensorsSource(tmp_path / "model.safetensors"), RULES, _abstract(),
                    tmp_path / "out", {})
    code = textwrap.dedent(f"""
        import numpy as np
        from flax import nnx
        import sys; sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_weights import _abstract
        from edit_r1_jax import weights
        from edit_r1_jax.parallel import mesh, rules
        m = mesh.make_mesh({{"data": 2, "fsdp": 2, "tensor": 2}})
        abstract = _abstract()
        state = weights.load_state({str(tmp_path / 'out')!r}, abstract, rules.state_shardings(abstract, m))
        k = state["proj"]["kernel"].get_value()
        assert tuple(k.sharding.spec) == ("fsdp", "tensor"), k.sharding.spec
        assert k.addressable_shards[0].data.shape == (2, 3)
        ref = weights.read_tensors({str(tmp_path / 'out' / 'params.safetensors')!r})["proj.kernel"]
        np.testing.assert_array_equal(np.asarray(k), ref)
        print("OK")
    """)
    env = device_env(8)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
