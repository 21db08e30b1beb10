"""The recipe's own argument groups, parsed with `trl.TrlParser` next to a trainer's config.

Every stage command takes some of these dataclasses plus its trainer's config (`FlowMatchingConfig`,
`DPOConfig`, `GRPOConfig`); YAML keys and `--flags` fill them by field name, so no field name here may
repeat one of `transformers.TrainingArguments` (`seed`, `output_dir`, `resolution`, ... live there for the
training stages). Each dataclass validates itself at construction and names the field and the fix.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field, fields

from rlhf_image.recipes.ovis_image.data import VOCABULARIES
from rlhf_image.recipes.ovis_image.model import OVIS_IMAGE_7B_HUB_ID
from rlhf_image.rollout.engine import TRANSPORTS

DATASET_FORMATS = ("synthetic", "folder", "manifest", "parquet", "tar")
TORCH_DTYPES = ("float32", "bfloat16", "float16")
TRANSFORMER_INITS = ("pretrained", "random")


def is_hub_id(name: str) -> bool:
    """`owner/name` whose first part is not a local folder (a missing stage folder such as `outputs/sft` is not
    taken for a Hub id)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not os.path.isdir(name.split("/")[0])


@dataclass
class ModelArguments:
    """Which model a stage starts from.

    `model` is `"tiny"` (the CPU-size Ovis-Image, built from the `tiny_*` fields), `"7b"` (the full
    Ovis-Image, each part from `hub_id` unless overridden), the output folder of a previous stage (the
    stages chain through these folders: sft starts from pretrain's, dpo from sft's, grpo from dpo's), or any
    diffusers pipeline folder or Hub id of a built-in family (FLUX.1, SD3, Qwen-Image, ...: its
    `model_index.json` names the pipeline class).
    """

    model: str = field(
        default="tiny",
        metadata={"help": "'tiny', '7b', the output folder of a previous stage (a diffusers pipeline folder, or a "
                          "LoRA folder written by a stage, whose base it names), or a diffusers folder or Hub id of "
                          "any built-in family (found from its model_index.json)."})
    transformer_init: str = field(
        default="pretrained",
        metadata={"help": "'random' re-initialises the MMDiT with the architecture of `model` (pretraining from "
                          "scratch); 'pretrained' keeps the model's weights. A tiny model is random either way."})
    hub_id: str = field(default=OVIS_IMAGE_7B_HUB_ID, metadata={"help": "Folder or Hub id of the 7B pipeline."})
    text_encoder_path: str | None = field(
        default=None, metadata={"help": "7b: another source of the Qwen3 text encoder (Ovis2.5's language model)."})
    vae_path: str | None = field(
        default=None,
        metadata={"help": "A VAE folder replacing the model's: the fitted tiny VAE (`rlhf-image fit-vae`), or "
                          "FLUX.1-schnell for 7b (its `vae` subfolder is used)."})
    torch_dtype: str = field(
        default="float32",
        metadata={"help": "Weights dtype: 'float32' (master weights for bf16 mixed precision), 'bfloat16', "
                          "'float16'."})
    frozen_dtype: str | None = field(
        default=None,
        metadata={"help": "Dtype of the frozen text encoder and VAE (default: torch_dtype). 'bfloat16' with "
                          "torch_dtype 'float32' keeps fp32 master weights for the trained transformer only and "
                          "halves the frozen parts' memory (4.9 GiB less per GPU at 7B)."})
    max_sequence_length: int = field(
        default=256, metadata={"help": "Text tokens the model sees (Ovis-Image: 256 after its 28-token chat prefix; "
                                       "other families: their pipeline's max_sequence_length)."})
    model_seed: int = field(default=0, metadata={"help": "Seed of random initialisations (tiny model, 'random')."})
    # The tiny model; the defaults are the sizes of `rlhf_image.recipes.ovis_image.model.ovis_image_tiny_text` (measured).
    tiny_hidden_size: int = field(default=128, metadata={"help": "Tiny MMDiT width."})
    tiny_num_heads: int = field(default=4, metadata={"help": "Tiny MMDiT attention heads."})
    tiny_num_layers: int = field(default=1, metadata={"help": "Tiny MMDiT double-stream blocks."})
    tiny_num_single_layers: int = field(default=2, metadata={"help": "Tiny MMDiT single-stream blocks."})
    tiny_axes_dims_rope: list[int] = field(
        default_factory=lambda: [4, 14, 14], metadata={"help": "RoPE axes dims; must sum to the head dim."})
    tiny_latent_channels: int = field(default=4, metadata={"help": "Tiny VAE latent channels."})
    tiny_vae_block_out_channels: list[int] = field(
        default_factory=lambda: [8, 16],
        metadata={"help": "Tiny VAE block widths (n blocks downsample 2^(n-1) times)."})
    tiny_vae_mid_block_attention: bool = field(
        default=False, metadata={"help": "Keep the tiny VAE's mid-block self-attention (slow on the CPU)."})
    tiny_text_hidden_size: int = field(default=32, metadata={"help": "Tiny (frozen, random) Qwen3 width."})
    tiny_text_layers: int = field(default=2, metadata={"help": "Tiny Qwen3 layers."})

    def __post_init__(self):
        if self.model not in ("tiny", "7b") and not os.path.isdir(self.model) and not is_hub_id(self.model):
            raise ValueError(f"model={self.model!r} is neither 'tiny', '7b', an existing folder nor a Hub id; run "
                             "the previous stage first (its output_dir is this stage's model) or fix the path")
        if self.transformer_init not in TRANSFORMER_INITS:
            raise ValueError(f"transformer_init={self.transformer_init!r}; use one of {list(TRANSFORMER_INITS)}")
        if self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"torch_dtype={self.torch_dtype!r}; use one of {list(TORCH_DTYPES)}")
        if self.frozen_dtype is not None and self.frozen_dtype not in TORCH_DTYPES:
            raise ValueError(f"frozen_dtype={self.frozen_dtype!r}; use one of {list(TORCH_DTYPES)} or leave it unset "
                             "(= torch_dtype)")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length={self.max_sequence_length} must be >= 1")
        if self.model == "tiny":
            if min(self.tiny_hidden_size, self.tiny_num_heads, self.tiny_num_layers + self.tiny_num_single_layers) < 1:
                raise ValueError("tiny_hidden_size, tiny_num_heads and the number of blocks must be >= 1")
            head_dim = self.tiny_hidden_size // self.tiny_num_heads
            if self.tiny_hidden_size % self.tiny_num_heads or sum(self.tiny_axes_dims_rope) != head_dim:
                raise ValueError(f"tiny_axes_dims_rope={self.tiny_axes_dims_rope} must sum to the head dim "
                                 f"tiny_hidden_size / tiny_num_heads = {self.tiny_hidden_size}/{self.tiny_num_heads}; "
                                 "change either")
            if self.vae_path and not os.path.isdir(self.vae_path):
                raise ValueError(f"vae_path={self.vae_path!r} is not a folder; fit the tiny VAE first "
                                 "(`rlhf-image fit-vae`, whose output_dir this is) or unset vae_path")
            if len(self.tiny_axes_dims_rope) != 3:
                raise ValueError(f"tiny_axes_dims_rope={self.tiny_axes_dims_rope} needs 3 entries (index, row, col)")


@dataclass
class DataArguments:
    """Where images (pretrain, sft, the pair pool) or prompts (grpo, eval) come from.

    `dataset_format="synthetic"` renders text images on the fly (`rlhf_image.recipes.ovis_image.data`); the file formats
    read `dataset_path` with `rlhf_image.data` (unreadable images are skipped and counted).
    """

    dataset_format: str = field(
        default="synthetic",
        metadata={"help": "'synthetic' (rendered text), 'folder' (images + .txt captions), 'manifest' (JSONL/CSV), "
                          "'parquet' or 'tar' (webdataset shards). GRPO reads prompts from 'synthetic' or "
                          "'manifest' (no image needed)."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "Folder, manifest file, or parquet / tar glob (file formats only)."})
    image_column: str = field(default="image", metadata={"help": "Image column of a manifest or parquet file."})
    prompt_column: str = field(default="prompt", metadata={"help": "Text (prompt) column of a manifest or parquet "
                                                                   "file, or the text field of a tar shard's .json."})
    synthetic_num_samples: int = field(default=20000, metadata={"help": "Synthetic items (rows, or prompts)."})
    synthetic_mode: str = field(default="simple", metadata={"help": "'simple' (demo task) or 'varied'."})
    synthetic_vocabulary: str = field(
        default="digits", metadata={"help": f"Target strings: one of {list(VOCABULARIES)}."})
    synthetic_min_length: int = field(default=4, metadata={"help": "Shortest target, in digits or words."})
    synthetic_max_length: int = field(default=4, metadata={"help": "Longest target, in digits or words."})
    synthetic_height: int = field(default=48, metadata={"help": "Rendered image height in pixels."})
    synthetic_width: int = field(default=48, metadata={"help": "Rendered image width in pixels."})
    synthetic_caption_language: str | None = field(
        default=None, metadata={"help": "'en', 'zh' or 'mixed' captions (default: by mode)."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic generator."})

    def __post_init__(self):
        if self.dataset_format not in DATASET_FORMATS:
            raise ValueError(f"dataset_format={self.dataset_format!r}; use one of {list(DATASET_FORMATS)}")
        if self.dataset_format != "synthetic" and not self.dataset_path:
            raise ValueError(f"dataset_format={self.dataset_format!r} reads `dataset_path`, which is unset; set it "
                             "or use dataset_format='synthetic'")
        if self.synthetic_vocabulary not in VOCABULARIES:
            raise ValueError(f"synthetic_vocabulary={self.synthetic_vocabulary!r}; use one of {list(VOCABULARIES)}")
        if self.synthetic_num_samples < 1:
            raise ValueError(f"synthetic_num_samples={self.synthetic_num_samples} must be >= 1")


@dataclass
class RecipeArguments:
    """Settings of a training stage that are not the trainer's: resuming and LoRA."""

    resume: str | None = field(
        default=None,
        metadata={"help": "'latest': continue from the newest checkpoint-* in output_dir (a fresh start, with a "
                          "message, when there is none); or a checkpoint folder."})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank; 0 trains every transformer weight."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (defaults to the rank)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                 "to_add_out"],
        metadata={"help": "Transformer modules that get adapters (the attention projections by default)."})

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 0 (0 = full fine-tuning)")
        if self.resume is not None and self.resume != "latest" and not os.path.isdir(self.resume):
            raise ValueError(f"resume={self.resume!r} is neither 'latest' nor a checkpoint folder")


@dataclass
class RewardArguments:
    """Reward functions: names of `rlhf_image.recipes.ovis_image.stages.inputs.RECIPE_REWARDS` or `module:attr`
    paths."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["ocr"],
        metadata={"help": "Rewards: 'ocr', 'aesthetic', 'clip', 'pickscore', 'hpsv3', 'vlm_judge', 'imagereward', or "
                          "'package.module:name' (a callable, or a class built with no arguments)."})
    ocr_detection: bool = field(
        default=True,
        metadata={"help": "OCR with text detection (real images); False reads the image as one line (tiny demo)."})
    reward_threads: int | None = field(default=None, metadata={"help": "onnxruntime threads of the OCR reward."})
    aesthetic_mlp: str | None = field(
        default=None, metadata={"help": "'aesthetic': the LAION predictor weights (.pth or .safetensors)."})
    clip_model: str = field(
        default="openai/clip-vit-large-patch14", metadata={"help": "CLIP of 'aesthetic' and 'clip' (path or Hub id)."})
    pickscore_model: str = field(
        default="yuvalkirstain/PickScore_v1", metadata={"help": "'pickscore': the PickScore model (path or Hub id)."})
    hpsv3_checkpoint: str = field(
        default="MizzenAI/HPSv3",
        metadata={"help": "'hpsv3': folder or Hub id holding HPSv3.safetensors, or the file."})
    hpsv3_base_model: str = field(
        default="Qwen/Qwen2-VL-7B-Instruct",
        metadata={"help": "'hpsv3': its base model's config, tokenizer and image processor (path or Hub id)."})
    vlm_judge_model: str = field(
        default="Qwen/Qwen2.5-VL-7B-Instruct",
        metadata={"help": "'vlm_judge': the vision-language model asked about each image (path or Hub id)."})
    vlm_judge_template: str = field(
        default='Does this figure show "{prompt}"? Please answer yes or no.',
        metadata={"help": "'vlm_judge': the yes/no question, with {prompt} where the prompt goes."})
    vlm_judge_image_size: int | None = field(
        default=None, metadata={"help": "'vlm_judge': resize images to this square size first (fewer image tokens)."})
    image_reward_model: str = field(
        default="THUDM/ImageReward",
        metadata={"help": "'imagereward': folder or Hub id holding ImageReward.pt and med_config.json."})
    image_reward_tokenizer: str = field(
        default="bert-base-uncased", metadata={"help": "'imagereward': its BERT tokenizer (path or Hub id)."})
    reward_device: str = field(
        default="cpu", metadata={"help": "Device of the model rewards (aesthetic, clip, pickscore, hpsv3, vlm_judge, "
                                         "imagereward), e.g. 'cuda'."})

    def __post_init__(self):
        if not self.reward_funcs:
            raise ValueError("reward_funcs is empty; name at least one reward, e.g. ['ocr']")
        if "aesthetic" in self.reward_funcs and not self.aesthetic_mlp:
            raise ValueError("reward 'aesthetic' needs `aesthetic_mlp` (the LAION predictor weights file)")
        if "vlm_judge" in self.reward_funcs and "{prompt}" not in self.vlm_judge_template:
            raise ValueError(f"vlm_judge_template={self.vlm_judge_template!r} has no {{prompt}} slot; put {{prompt}} "
                             "where the prompt goes")


@dataclass
class PairDataArguments:
    """The preference pairs of the DPO stage."""

    pairs_path: str | None = field(
        default=None, metadata={"help": "Folder written by `rlhf-image build-pairs` (manifest.jsonl + images)."})

    def __post_init__(self):
        if self.pairs_path is None or not os.path.isfile(os.path.join(self.pairs_path, "manifest.jsonl")):
            raise ValueError(f"pairs_path={self.pairs_path!r} holds no manifest.jsonl; run `rlhf-image build-pairs` "
                             "and pass its output_dir")


@dataclass
class RolloutArguments:
    """Where the GRPO stage samples its rollouts: in its training process (`num_rollout_workers=0`, the default)
    or on `num_rollout_workers` Ray actors of a `rlhf_image.rollout.RayRolloutEngine`, each of which builds the stage's input
    model itself; only the trainable weights (the adapter with `lora_rank > 0`) travel at each weight sync.

    Under `torchrun`/`deepspeed` with several trainer processes (DDP or ZeRO-1/2), rank 0 starts the workers and
    drives them for every rank (`rlhf_image.SharedRolloutEngine`): each rank gets the samples it would have sampled
    itself. ZeRO-3 is refused (its parameters are partitioned, so rank 0 has no whole weights to send).
    """

    num_rollout_workers: int = field(
        default=0,
        metadata={"help": "0: sample in the training process(es); N >= 1: N Ray rollout workers (one GPU each on "
                          "a cluster with GPUs)."})
    ray_address: str | None = field(
        default=None,
        metadata={"help": "Ray rollouts: 'auto' joins the cluster of `ray start` on this node (or a 'host:port' / "
                          "'ray://...' address); unset starts a private local Ray on 127.0.0.1 (RAY_ADDRESS, when "
                          "set, is used instead)."})
    num_gpus_per_worker: float | None = field(
        default=None,
        metadata={"help": "Ray rollouts: GPUs per rollout worker (default: 1 when the cluster has GPUs, else 0)."})
    num_reward_workers: int = field(
        default=0,
        metadata={"help": "Ray rollouts: reward actors for CPU-bound rewards such as OCR (the trainer's rewards "
                          "are pickled to them); 0 scores in the trainer process."})
    num_cpus_per_reward_worker: float = field(default=1.0, metadata={"help": "Ray rollouts: CPUs per reward actor."})
    weight_transport: str = field(
        default="object_store",
        metadata={"help": "Ray rollouts: 'object_store' (fine for a LoRA adapter) or 'collective' (a NCCL / gloo "
                          "broadcast, for the full weights of a large model)."})
    worker_threads: int | None = field(
        default=None, metadata={"help": "Ray rollouts: torch threads in each CPU rollout worker."})

    def __post_init__(self):
        self.ray_address = self.ray_address or None  # `--ray_address ""` unsets it, as for vae_path
        if self.num_rollout_workers < 0:
            raise ValueError(f"num_rollout_workers={self.num_rollout_workers} must be >= 0 (0 samples in the "
                             "training process, N >= 1 on N Ray workers)")
        if self.num_reward_workers < 0:
            raise ValueError(f"num_reward_workers={self.num_reward_workers} must be >= 0 (0 scores in the trainer)")
        if self.num_gpus_per_worker is not None and self.num_gpus_per_worker < 0:
            raise ValueError(f"num_gpus_per_worker={self.num_gpus_per_worker} must be >= 0, or unset it (1 on a "
                             "cluster with GPUs, else 0)")
        if self.num_cpus_per_reward_worker < 0:
            raise ValueError(f"num_cpus_per_reward_worker={self.num_cpus_per_reward_worker} must be >= 0")
        if self.worker_threads is not None and self.worker_threads < 1:
            raise ValueError(f"worker_threads={self.worker_threads} must be >= 1, or unset it (torch's default)")
        if self.weight_transport not in TRANSPORTS:
            raise ValueError(f"weight_transport={self.weight_transport!r}; use one of {list(TRANSPORTS)}")
        if self.num_rollout_workers == 0:
            # A Ray setting without Ray workers would be silently ignored.
            for ray_field in fields(self)[1:]:  # every field after num_rollout_workers is a Ray setting
                value = vars(self)[ray_field.name]
                if value != ray_field.default:
                    raise ValueError(f"{ray_field.name}={value!r} applies to Ray rollouts only, but "
                                     "num_rollout_workers=0 samples in the training process; set "
                                     f"num_rollout_workers >= 1 or drop {ray_field.name}")
            return
        if importlib.util.find_spec("ray") is None:
            raise ValueError(f"num_rollout_workers={self.num_rollout_workers} needs Ray: pip install "
                             "'rlhf-image[ray]', or set num_rollout_workers=0")
