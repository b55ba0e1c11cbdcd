"""Write the tiny offline model directory the demo profiles use (tokenizer + config, no weights).

The Dynamo mocker needs a tokenizer, a ``config.json`` and a chat template from a LOCAL directory:
this machine reaches no model hub. A byte-level BPE trained on a few sentences is enough for the
frontend to tokenize prompts and for the mocker to count tokens. The output is committed under
``profiles/demo-model``; rerun this script only to change it::

    python scripts/make_demo_model.py profiles/demo-model
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "LMCache stores KV caches so that text is prefilled once and reused everywhere.",
    "Dynamo serves large language models with a frontend and vLLM workers.",
    "In disaggregated mode a decode worker and a prefill worker pass KV caches over NIXL.",
    "The quick brown fox jumps over the lazy dog. Hello world! What is the answer?",
    "user assistant system: you are a helpful assistant. 0123456789 , . ; : ? ! ' \" ( )",
]
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build(out: Path) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size()
    bos, eos = tokenizer.token_to_id(SPECIAL[0]), tokenizer.token_to_id(SPECIAL[4])
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL[0],
        "eos_token": SPECIAL[4],
        "model_max_length": 8192,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {"bos_token_id": bos, "eos_token_id": eos}
    for name, body in (
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation_config),
    ):
        (out / name).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "profiles/demo-model"))
