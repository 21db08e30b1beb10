"""The Ovis-Image recipe's stages, one module each, torchtune style: a recipe class with `setup()`, `train()`
and `cleanup()`, and a `run(...)` that the `rlhf-image` command line and the CPU demo both call.

    fit_vae      the tiny VAE (the CPU demo only; the 7B recipe uses FLUX.1-schnell's VAE)
    pretrain     1. flow matching from a randomly initialised MMDiT
    sft          2. flow matching from the pretrained model
    build_pairs  3a. preference pairs: pool image vs SFT sample, scored by rewards
    dpo          3b. Flow-DPO (+ Diffusion-SDPO) on those pairs
    grpo         4. Flow-GRPO with CPS sampling and a KL to the DPO model
    nft          4'. DiffusionNFT (or AWM) from the DPO model: ODE rollouts, no log-probs (an alternative to grpo)
    evaluation   held-out text-rendering metrics and sample grids (`rlhf-image eval`)
    sample       prompts -> images
"""
