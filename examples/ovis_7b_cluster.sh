# Launch commands for the 7B Ovis-Image recipe on a GPU cluster, quoted by docs/ovis_image_recipe.md.
# Not a script to run top to bottom: each section runs on the nodes it names, from the repository root (the configs
# name recipes/ovis_image/ds_zero*.json relatively), in the same Python environment on every node. HEAD_ADDR is the
# first node's address on the cluster network; NODE_RANK is 0 on it and 1, 2, 3 on the others.
# tests/test_docs.py parses every command below with the real parsers (torchrun's, the deepspeed launcher's,
# `ray start`'s, and the stages' own) and checks the stage configs they name.
exit 1

# [start:torchrun_multinode]
# on each of the 4 nodes, NODE_RANK=0..3 (32 GPUs):
torchrun --nnodes 4 --nproc_per_node 8 --node_rank "$NODE_RANK" --master_addr "$HEAD_ADDR" --master_port 29500 \
    -m rlhf_image.recipes.cli pretrain --config recipes/ovis_image/configs/ovis_7b_pretrain_1024.yaml
# [end:torchrun_multinode]

# [start:deepspeed_hostfile]
# on the first node only; it reaches the nodes of the hostfile over passwordless ssh (pdsh):
deepspeed --hostfile examples/hostfile --master_addr "$HEAD_ADDR" --master_port 29500 --no_local_rank \
    --module rlhf_image.recipes.cli sft --config recipes/ovis_image/configs/ovis_7b_sft.yaml
# [end:deepspeed_hostfile]

# [start:ray_head]
# first node: GPU 0 stays with the trainer, Ray gets GPUs 1-7 for rollout workers
CUDA_VISIBLE_DEVICES=1,2,3,4,5,6,7 ray start --head --node-ip-address "$HEAD_ADDR" --port 6379 --num-gpus 7 \
    --include-dashboard false
# [end:ray_head]

# [start:ray_worker]
# every other node: all 8 GPUs for rollout workers
ray start --address "$HEAD_ADDR:6379" --num-gpus 8
# [end:ray_worker]

# [start:ray_grpo]
# first node, one trainer process on GPU 0 (2 nodes: 7 + 8 rollout workers, OCR scored by 4 reward actors;
# 32 accumulation steps keep the 128 images per step of the config's 8-GPU torchrun launch):
CUDA_VISIBLE_DEVICES=0 rlhf-image grpo --config recipes/ovis_image/configs/ovis_7b_grpo.yaml --ray_address auto \
    --num_rollout_workers 15 --num_gpus_per_worker 1 --num_reward_workers 4 --gradient_accumulation_steps 32
# [end:ray_grpo]

# [start:ray_grpo_torchrun]
# first node, full-weight GRPO on 4 trainer processes (GPUs 0-3, ZeRO-2) sharing the rollout workers that
# `ray start` was given GPUs 4-7 and the other nodes for; rank 0 drives them for all 4 ranks:
CUDA_VISIBLE_DEVICES=0,1,2,3 torchrun --nproc_per_node 4 -m rlhf_image.recipes.cli grpo \
    --config recipes/ovis_image/configs/ovis_7b_grpo.yaml --lora_rank 0 --deepspeed recipes/ovis_image/ds_zero2.json \
    --ray_address auto --num_rollout_workers 12 --num_gpus_per_worker 1 --num_reward_workers 4 \
    --gradient_accumulation_steps 8
# [end:ray_grpo_torchrun]

# [start:ray_stop]
# every node, when done:
ray stop
# [end:ray_stop]
