"""The tiny Ovis-Image tokenizer: the chat prefix the pipeline drops is exactly its 28 tokens, so the
user prompt survives a short `max_sequence_length`."""

import pytest
import torch

from rlhf_image.recipes.ovis_image.model import (OVIS_SYSTEM_PROMPT_PIECES, TINY_TEXT_MAX_SEQUENCE_LENGTH, byte_level_tokenizer,
                                      ovis_image_tiny, ovis_image_tiny_text, ovis_prefix_tokenizer)
from rlhf_image.policy import FlowPolicy

PROMPT = 'A sign that says "1234"'


@pytest.fixture(scope="module")
def prefix_pipe():
    return ovis_image_tiny(tokenizer=ovis_prefix_tokenizer())


def test_dropped_prefix_is_exactly_the_chat_header_and_system_prompt(prefix_pipe):
    tokenizer = prefix_pipe.tokenizer
    # The string the diffusers pipeline itself builds, and the number of tokens it drops.
    message = prefix_pipe._get_messages([PROMPT])[0]
    begin = prefix_pipe.user_prompt_begin_id
    assert begin == 28
    ids = tokenizer(message, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids[:begin]) == "<|im_start|>user\n" + prefix_pipe.system_prompt
    assert tokenizer.decode(ids[begin:begin + len(PROMPT)]) == PROMPT
    # Digits and quotes stay one token per byte.
    assert [tokenizer.decode([i]) for i in ids[begin + len(PROMPT) - 6:begin + len(PROMPT)]] == list('"1234"')


@pytest.mark.parametrize("prompt", ["", "7", "二维码 and the theater, user: 'x'", "objects and background: ok"])
def test_any_prompt_still_starts_at_token_28_and_round_trips(prefix_pipe, prompt):
    tokenizer = prefix_pipe.tokenizer
    message = prefix_pipe._get_messages([prompt])[0]
    ids = tokenizer(message, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == message
    assert tokenizer.decode(ids[:28]) == "<|im_start|>user\n" + prefix_pipe.system_prompt
    assert tokenizer.decode(ids[28:]).startswith(prompt + "<|im_end|>")


def test_byte_level_tokenizer_is_unchanged_by_default():
    tokenizer = byte_level_tokenizer()
    assert len(tokenizer) == 5 + 256
    assert len(tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids) == 1 + 4 + 1
    prefix = ovis_prefix_tokenizer()
    for piece in ("user", *OVIS_SYSTEM_PROMPT_PIECES):
        assert len(prefix(piece, add_special_tokens=False).input_ids) == 1, piece


def test_short_max_sequence_length_keeps_the_prompt_in_the_conditioning(prefix_pipe):
    max_len = 24
    policy = FlowPolicy.from_pipeline(prefix_pipe, max_sequence_length=max_len)
    a, b = policy.encode_prompt([PROMPT, PROMPT.replace("1234", "1235")]).prompt_embeds
    assert a.shape == (max_len, prefix_pipe.text_encoder.config.hidden_size)
    # The text encoder is causal: states before the last digit (index 21) agree, from it on they differ.
    last_digit = PROMPT.index("4")
    torch.testing.assert_close(a[:last_digit], b[:last_digit], rtol=0, atol=0)
    assert (a[last_digit] - b[last_digit]).abs().max() > 1e-3
    # The diffusers pipeline encodes the same states.
    reference = prefix_pipe.encode_prompt([PROMPT], do_classifier_free_guidance=False, max_sequence_length=max_len)[0]
    torch.testing.assert_close(policy.encode_prompt([PROMPT]).prompt_embeds, reference)


def test_the_byte_tokenizer_loses_the_prompt_at_the_same_length(ovis_pipe):
    # Why the prefix tokenizer exists: with one token per byte, 24 tokens after the dropped 28 are all
    # system prompt, so different prompts give identical conditioning.
    policy = FlowPolicy.from_pipeline(ovis_pipe, max_sequence_length=24)
    a, b = policy.encode_prompt([PROMPT, "something else"]).prompt_embeds
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_text_preset_has_the_measured_sizes_and_its_caption_fits():
    pipe = ovis_image_tiny_text()
    transformer, vae, encoder = pipe.transformer.config, pipe.vae.config, pipe.text_encoder.config
    assert sum(p.numel() for p in pipe.transformer.parameters()) == 1_443_376
    assert (transformer.num_layers, transformer.num_single_layers) == (1, 2)
    assert (transformer.num_attention_heads, transformer.attention_head_dim, transformer.in_channels) == (4, 32, 16)
    assert tuple(vae.block_out_channels) == (8, 16) and vae.latent_channels == 4 and not vae.mid_block_add_attention
    assert (encoder.hidden_size, encoder.num_hidden_layers) == (32, 2)
    policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=TINY_TEXT_MAX_SEQUENCE_LENGTH)
    assert policy.image_seq_len(32, 96) == 192
    message = pipe._get_messages([PROMPT])[0]
    ids = pipe.tokenizer(message, add_special_tokens=False).input_ids
    assert pipe.tokenizer.decode(ids[28:28 + TINY_TEXT_MAX_SEQUENCE_LENGTH]) == PROMPT + "<|im_end|>"
