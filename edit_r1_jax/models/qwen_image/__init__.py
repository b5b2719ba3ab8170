"""Qwen-Image(-Edit-2509) in Flax NNX: the MMDiT (``modeling``), the VAE (``autoencoder``) and their loaders
(``params``). Latent layout, position ids and the sigma schedule live in ``edit_r1_jax.diffusion.qwen_image``;
conversion is ``python -m tools.convert_weights qwen-image-edit --src PIPELINE_DIR --dst OUT``.

What an editor calls (converted folder OUT)::

    from edit_r1_jax.diffusion import qwen_image as Q
    from edit_r1_jax.models.qwen_image import params
    from edit_r1_jax.models.qwen_image.modeling import qwen_image_velocity

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
