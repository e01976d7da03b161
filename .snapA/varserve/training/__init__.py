"""Training a small model of the Infinity architecture on procedurally generated pictures.

    data.py               scenes (coloured shapes in named regions), their prompts, a vectorised renderer, and an
                          analytic checker that tells whether a picture shows what its prompt says
    presets.py            the shipped model's configs (transformer, VAE, text encoder)
    vae_train.py          a training-only encoder, the multi-scale BSQ quantizer (the generation loop's own
                          latent steps), and the VAE training loop
    transformer_train.py  a batched, block-causal, teacher-forced forward over the varserve modules' weights,
                          and the transformer training loop
    train.py              data -> VAE -> transformer -> weights folder -> evaluation, each phase time-boxed

Nothing here is imported by the serving code.
"""
