"""The paper's path end to end on tiny random models: converted Kontext pipeline + text cache + Qwen2.5-VL
reward, one epoch of the real trainer (configs/kontext_mllm.py with tiny sizes)."""

import pytest

from configs import kontext_mllm
from edit_r1_jax import train
from edit_r1_jax.embed_text import build_cache
from edit_dataset import check_one_epoch, tiny_paper_run, write_dataset
from kontext_tiny import RESOLUTION, T5_LENGTH, save_and_convert
from qwen_fixtures import convert_cli, qwen_tokenizer_dir, save_tiny_checkpoint

pytestmark = pytest.mark.slow


def test_kontext_mllm_epoch(tmp_path, tmp_path_factory):
    _, model_dir = save_and_convert(tmp_path)
    data = tmp_path / "data"
    write_dataset(data)
    for split in ("train", "test"):
        build_cache(model_dir, data, split, t5_length=T5_LENGTH)
    tok = qwen_tokenizer_dir(tmp_path_factory.getbasetemp())
    save_tiny_checkpoint(tmp_path / "qwen_hf", tok)
    qwen = convert_cli(tmp_path / "qwen_hf", tmp_path / "qwen")

    c = kontext_mllm.get_config("ban_prompt")
    tiny_paper_run(c, tmp_path / "run", model_dir, data, RESOLUTION, qwen)
    c.text.t5_length = T5_LENGTH
    out = train.run(c)
    check_one_epoch(out, tmp_path / "run")
