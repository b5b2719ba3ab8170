"""Helpers shared by test_pipeline.py and test_edit_cli.py: a tiny random diffusers FluxKontextPipeline (all
components, with small word-level tokenizers standing in for CLIP's BPE and T5's sentencepiece) saved with
``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch

RESOLUTION = 64  # VAE factor 8 -> 8x8 latents -> 4x4 = 16 image tokens (+16 reference tokens)
T5_LENGTH = 16
WORDS = "make the sky red turn cat into a dog add hat remove tree blue green".split()


def _word_tokenizer(specials: list[str], template: str, pad: str, eos: str, bos: str | None, max_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    kw = dict(pad_token=pad, eos_token=eos, unk_token="<unk>", model_max_length=max_len)
    if bos:
        kw["bos_token"] = bos
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def build_pipeline(seed: int = 0, with_text: bool = True):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                        layers_per_block=1, latent_channels=16, norm_num_groups=4, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096, time_shift_type="exponential")
    comps = dict(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None)
    if with_text:
        # CLIP stand-in: <s>=1 ... </s>=3, pads with </s> like FLUX's CLIP tokenizer; eos_token_id=3 (not 2)
        clip_tok = _word_tokenizer(["<unk>", "<s>", "<pad>", "</s>"], "<s> $A </s>", "</s>", "</s>", "<s>", 77)
        t5_tok = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", "<pad>", "</s>", None, 512)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=77, eos_token_id=3,
                                            bos_token_id=1, pad_token_id=3, projection_dim=16))
        t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     feed_forward_proj="gated-gelu"))
        comps.update(text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok)
    for m in comps.values():  # freshly constructed torch modules are in train mode (T5 dropout 0.1!)
        if isinstance(m, torch.nn.Module):
            m.eval()
    pipe = FluxKontextPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_and_convert(tmp: Path, with_text: bool = True) -> tuple[object, Path]:
    from tools.convert_weights.__main__ import main as convert_main

    pipe = build_pipeline(with_text=with_text)
    pipe.save_pretrained(tmp / "pipeline")
    convert_main(["kontext", "--src", str(tmp / "pipeline"), "--dst", str(tmp / "converted")])
    return pipe, tmp / "converted"
