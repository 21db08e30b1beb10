"""The tiny VAE (CPU demo only): fit the tiny model's `AutoencoderKL` on the training renders and freeze it.

The 7B recipe uses FLUX.1-schnell's pretrained VAE; no pretrained weights can be downloaded for the CPU demo,
and a random autoencoder cannot represent images, so this stage fits one with
`rlhf_image.recipes.ovis_image.tiny_vae.fit_tiny_vae` and saves it (a diffusers `AutoencoderKL` folder) for the
`vae_path` of the later stages.

    rlhf-image fit-vae --config recipes/ovis_image/configs/tiny_fit_vae.yaml
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from rlhf_image.recipes.ovis_image.model import ovis_image_tiny
from rlhf_image.recipes.ovis_image.tiny_vae import fit_tiny_vae, reconstruct
from rlhf_image.metrics import image_grid
from rlhf_image.policy import pil_to_tensor, tensor_to_pil

from .args import DataArguments, ModelArguments
from .common import StageResult, print_banner, write_stage_record
from .inputs import describe_data, synthetic_dataset


@dataclass
class FitVAEArguments:
    """Settings of the VAE fit (see `fit_tiny_vae`)."""

    output_dir: str = field(default="outputs/ovis_tiny/vae", metadata={"help": "Where the fitted VAE is saved."})
    vae_num_images: int = field(default=1024, metadata={"help": "Training renders the VAE is fitted on."})
    vae_num_steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    vae_batch_size: int = field(default=32, metadata={"help": "Images per step."})
    vae_learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate (cosine decay)."})
    vae_kl_weight: float = field(default=1e-3, metadata={"help": "Weight of the KL to the unit Gaussian."})
    seed: int = field(default=0, metadata={"help": "Seed of the batch draws and posterior samples."})

    def __post_init__(self):
        if min(self.vae_num_images, self.vae_num_steps, self.vae_batch_size) < 1:
            raise ValueError("vae_num_images, vae_num_steps and vae_batch_size must be >= 1")


ARGUMENTS = (ModelArguments, DataArguments, FitVAEArguments)


class FitVAERecipe:
    stage = "fit-vae"

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, args: FitVAEArguments):
        self.model_args, self.data_args, self.args = model_args, data_args, args

    def setup(self) -> None:
        model = self.model_args
        if model.model != "tiny":
            raise ValueError(f"fit-vae fits the tiny model's VAE, but model={model.model!r}; set model='tiny' "
                             "(the 7B recipe uses FLUX.1-schnell's VAE through vae_path)")
        if self.data_args.dataset_format != "synthetic":
            raise ValueError(f"fit-vae fits the tiny VAE on synthetic renders (the images the tiny recipe trains "
                             f"on), but dataset_format={self.data_args.dataset_format!r}; use "
                             "dataset_format='synthetic' (the synthetic_* fields set the renders)")
        self.vae = ovis_image_tiny(latent_channels=model.tiny_latent_channels,
                                   vae_block_out_channels=tuple(model.tiny_vae_block_out_channels),
                                   vae_mid_block_attention=model.tiny_vae_mid_block_attention,
                                   seed=model.model_seed).vae
        data = synthetic_dataset(self.data_args, num_samples=self.args.vae_num_images)
        self.images = pil_to_tensor([data[i]["image"] for i in range(len(data))])
        print_banner(self.stage, {
            "model": f"tiny AutoencoderKL, {model.tiny_latent_channels} latent channels, blocks "
                     f"{model.tiny_vae_block_out_channels}; {sum(p.numel() for p in self.vae.parameters()) / 1e3:.1f}k "
                     "parameters",
            "data": describe_data(self.data_args, len(data)),
            "hyper-parameters": {"steps": self.args.vae_num_steps, "batch_size": self.args.vae_batch_size,
                                 "learning_rate": self.args.vae_learning_rate, "kl_weight": self.args.vae_kl_weight,
                                 "seed": self.args.seed},
            "output_dir": self.args.output_dir,
        })

    def train(self) -> None:
        args = self.args
        self.result = fit_tiny_vae(self.vae, self.images, num_steps=args.vae_num_steps, batch_size=args.vae_batch_size,
                                   learning_rate=args.vae_learning_rate, kl_weight=args.vae_kl_weight, seed=args.seed)

    def cleanup(self) -> StageResult:
        output_dir, result = self.args.output_dir, self.result
        self.vae.save_pretrained(output_dir)
        # originals (top row) over their reconstructions (bottom row), for the report
        originals = self.images[:8]
        with torch.no_grad():
            rebuilt = reconstruct(self.vae, originals)
        image_grid(tensor_to_pil(torch.cat([originals, rebuilt])), columns=len(originals)).save(
            os.path.join(output_dir, "reconstructions.png"))
        record = {"stage": self.stage, "global_step": result.num_steps, "seconds": result.seconds,
                  "cpu_seconds": result.cpu_seconds,
                  "recon_l1": result.recon_l1, "shift_factor": result.shift_factor,
                  "scaling_factor": result.scaling_factor,
                  "log_history": [{"step": i + 1, "loss": loss} for i, loss in enumerate(result.losses)]}
        write_stage_record(output_dir, record)
        print(f"[rlhf-image] fit-vae: {result.num_steps} steps in {result.seconds:.1f}s, reconstruction L1 "
              f"{result.recon_l1:.4f}; VAE in {output_dir}", flush=True)
        return StageResult(self.stage, output_dir, record)


def run(model_args: ModelArguments, data_args: DataArguments, args: FitVAEArguments) -> StageResult:
    recipe = FitVAERecipe(model_args, data_args, args)
    recipe.setup()
    recipe.train()
    return recipe.cleanup()
