"""Qwen-Image(-Edit-2509) in Flax NNX: the MMDiT (``modeling``), the VAE (``autoencoder``), their loaders
(``params``) and the prompt embeddings from Qwen2.5-VL (``text``). Latent layout, position ids and the sigma
schedule live in ``edit_r1_jax.diffusion.qwen_image``; conversion is
``python -m tools.convert_weights qwen-image-edit --src PIPELINE_DIR --dst OUT``.

What an editor calls (converted folder OUT)::

    from edit_r1_jax.diffusion import qwen_image as Q
    from edit_r1_jax.models.qwen_image import params
    from edit_r1_jax.models.qwen_image.modeling import qwen_image_velocity

    from edit_r1_jax.models.qwen_image.text import QwenImagePromptEncoder

    enc = QwenImagePromptEncoder.from_pretrained(OUT, max_length=256, dtype=jnp.bfloat16, mesh=mesh)
    emb = enc(source_images_uint8, instructions)   # {"text": [B, 256, D] float32, "mask": [B, 256] int32}
    prompt_embeds, prompt_mask = emb["text"], emb["mask"]
    cfg, graphdef, base, lora = params.load_transformer(OUT / "transformer", mesh=mesh, lora=LoRAConfig(),
                                                        dtype=jnp.bfloat16, remat_policy="full")
    vae = params.load_vae(OUT / "vae")
    ref = Q.pack(vae.encode_normalized(ref_images))                      # [B, Nr, 64]
    img_ids, txt_ids = Q.position_ids(Q.img_shapes_for(H, W, refs=[(Hr, Wr)]), T,
                                      layer3d=cfg.use_layer3d_rope)
    v = lora_lib.apply(graphdef, base, lora, x_t, ref, prompt_embeds, prompt_mask, sigma, img_ids, txt_ids,
                       fn=qwen_image_velocity)                          # [B, N, 64]
    sigmas = Q.sigmas(steps, N, Q.read_scheduler_config(OUT))             # N = generated-image tokens
    images = vae.decode_normalized(Q.unpack(x0, H // 8, W // 8))         # [B, H, W, 3] in [-1, 1]
"""
