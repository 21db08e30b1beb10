"""DiffusionNFT (or AWM) with LoRA on your own diffusers model and your own reward, in one file: the GRPO example's
tiny FLUX.1 pipeline and colour reward, trained with `NFTTrainer` from deterministic rollouts (no SDE, no
log-probs, no CFG in training), saved, and loaded back into a fresh pipeline with plain diffusers.

    python examples/nft_lora_custom_model.py --output_dir /tmp/nft-lora --max_steps 4 [--loss_type awm]
"""

import argparse

import torch
from grpo_lora_custom_model import COLOURS, colour_reward, tiny_flux_pipeline
from peft import LoraConfig

from rlhf_image import NFTConfig, NFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="nft-lora-custom")
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--loss_type", default="nft", choices=["nft", "awm"])
    cli = parser.parse_args()

    dataset = [{"prompt": f"a {name} square", "target_colour": name} for name in COLOURS]
    # [start:config]
    args = NFTConfig(output_dir=cli.output_dir, max_steps=cli.max_steps, use_cpu=True, report_to=[],
                     loss_type=cli.loss_type,  # "nft": DiffusionNFT; "awm": Advantage Weighted Matching
                     num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     resolution=32, num_inference_steps=4,  # ODE rollouts without CFG: the NFTConfig defaults
                     nft_beta=1.0, timestep_fraction=0.5, awm_num_timesteps=1,  # noise levels trained per image
                     old_policy_decay_rate=0.001, old_policy_max_decay=0.5,  # the paper's min(0.001 i, 0.5)
                     learning_rate=3e-2, lr_scheduler_type="constant", save_strategy="no", log_samples_steps=0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"])
    trainer = NFTTrainer(tiny_flux_pipeline(), colour_reward, args=args, train_dataset=dataset, peft_config=lora)
    trainer.train()
    trainer.save_model(cli.output_dir)
    # [end:config]

    pipe = tiny_flux_pipeline()
    pipe.load_lora_weights(cli.output_dir)
    image = pipe("a red square", height=32, width=32, num_inference_steps=4, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    rewards = [e["rewards/colour_reward/mean"] for e in trainer.state.log_history if "rewards/colour_reward/mean" in e]
    parts = [(round(e["loss/positive"], 4), round(e["loss/negative"], 4)) for e in trainer.state.log_history
             if "loss/positive" in e]
    print(f"mean reward per step: {[round(r, 4) for r in rewards]}")
    if parts:
        print(f"(positive, negative) loss parts per step: {parts}")
    print(f"saved LoRA to {cli.output_dir}; reloaded pipeline reward on 'a red square': "
          f"{colour_reward(['a red square'], [image], ['red'])[0]:.4f}")


if __name__ == "__main__":
    main()
