"""Mesh construction, logical-axis rules and config validation (the start-up checks)."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import kontext_mllm, toy
from edit_r1_jax import config as config_lib
from edit_r1_jax.parallel import mesh as mesh_lib
from edit_r1_jax.parallel import rules


def test_resolve_shape_fills_and_rejects():
    assert mesh_lib.resolve_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_lib.resolve_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_lib.resolve_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="needs 4 devices, 8 available"):
        mesh_lib.resolve_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="unknown axis 'model'"):
        mesh_lib.make_mesh({"model": 1})


class _FakeMesh:
    shape = {"data": 2, "fsdp": 4, "tensor": 2}


def test_partition_spec_rules():
    m = _FakeMesh()
    assert rules.partition_spec(("embed", "heads"), (64, 64), m) == P("fsdp", "tensor")
    assert rules.partition_spec(("batch", "length", "act_embed"), (16, 7, 64), m) == P(("data", "fsdp"), None, None)
    # a mesh axis is used once: the second "embed" stays whole
    assert rules.partition_spec(("embed", "embed"), (64, 64), m) == P("fsdp", None)
    # an activation dimension the mesh axes do not divide is replicated (a batch of 1 is legitimate) ...
    assert rules.partition_spec(("embed", "heads"), (6, 64), m) == P(None, "tensor")
    # ... a parameter's is an error naming parameter, shape and axes (tests below)
    with pytest.raises(KeyError, match="no sharding rule"):
        rules.partition_spec(("nonsense",))
    with pytest.raises(ValueError, match="do not match parameter"):
        rules.param(jax.numpy.zeros((2, 3)), ("embed",))


def test_constrain_is_identity_without_mesh():
    x = jax.numpy.ones((4, 3))
    assert rules.constrain(x, ("batch", None)) is x


def test_validate_accepts_shipped_configs():
    d = config_lib.validate(toy.get_config())
    assert d["train_timesteps"] == 5 and d["micro_batches_per_step"] == 1
    c = kontext_mllm.get_config("ban_prompt")
    c.model.dir, c.data.root, c.reward.mllm_dir = "m", "d", "q"
    d = config_lib.validate(c, num_processes=1, data_parallel=24)
    assert d == dict(samples_per_batch=72, samples_per_epoch=288, samples_per_step=288, micro_batches_per_step=4,
                     train_timesteps=5)
    assert c.filter.enabled


def test_validate_names_every_bad_field():
    c = toy.get_config()
    c.sample.solver = "rk4"
    c.train.adv_mode = "mostly"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    assert "sample.solver='rk4'" in str(e.value) and "train.adv_mode='mostly'" in str(e.value)

    c = toy.get_config()
    c.train.micro_batch_size = 24
    with pytest.raises(config_lib.ConfigError, match="train.micro_batch_size=24"):
        config_lib.validate(c)
    c = toy.get_config()
    with pytest.raises(config_lib.ConfigError, match=r"data-parallel device count 3"):
        config_lib.validate(c, data_parallel=3)
    c = kontext_mllm.get_config()
    with pytest.raises(config_lib.ConfigError, match="model.dir is empty"):
        config_lib.validate(c)
    with pytest.raises(ValueError, match="unknown variant"):
        kontext_mllm.get_config("nope")


class _Proj(nnx.Module):
    def __init__(self):
        self.kernel = rules.param(jax.numpy.zeros((6, 64)), ("embed", "heads"))


class _Tiny(nnx.Module):
    def __init__(self):
        self.proj = _Proj()


def test_parameter_that_does_not_divide_raises_unless_allowed(caplog):
    state = nnx.state(_Tiny())
    with pytest.raises(rules.PlacementError) as e:
        rules.state_shardings(state, _FakeMesh())
    msg = str(e.value)
    assert "'proj.kernel'" in msg and "(6, 64)" in msg and "('fsdp',)" in msg and "size 4" in msg
    assert "mesh.allow_replicated_fallback" in msg
    try:
        rules.set_allow_replicated_fallback(True)
        with caplog.at_level("WARNING", logger="edit_r1_jax.parallel.rules"):
            assert rules.partition_spec(("embed", "heads"), (6, 64), _FakeMesh(), name="proj.kernel") == P(
                None, "tensor")
        assert any(r.levelname == "WARNING" and "'proj.kernel'" in r.getMessage() for r in caplog.records)
    finally:
        rules.set_allow_replicated_fallback(False)


def test_mesh_layout_failure_raises_unless_allowed(monkeypatch, caplog):
    # create_device_mesh never fails for CPU devices; on TPU it raises ValueError for a shape the torus cannot
    # hold. Stand in for that jax-side failure (our fallback logic is what is tested, not jax's).
    def torus_refuses(sizes, devices=None, **kw):
        raise ValueError(f"cannot lay out {sizes} on the physical torus")

    monkeypatch.setattr(mesh_lib.mesh_utils, "create_device_mesh", torus_refuses)
    with pytest.raises(mesh_lib.MeshError, match=r"mesh \{'data': 1, 'fsdp': 1, 'tensor': 1\}.*physical torus"):
        mesh_lib.make_mesh({"data": -1})
    with caplog.at_level("WARNING", logger="edit_r1_jax.parallel.mesh"):
        m = mesh_lib.make_mesh({"data": -1, "allow_replicated_fallback": True})
    assert m.shape["data"] == jax.device_count()
    assert any("device order as listed" in r.getMessage() for r in caplog.records)
    rules.set_allow_replicated_fallback(False)  # make_mesh set it process-wide; later tests expect the default
