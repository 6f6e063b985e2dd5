"""`Z2allTokenizer`: the transformers tokenizer class shipped inside every z2all tokenizer directory.

This file is copied verbatim next to tokenizer.json and loaded through `auto_map` with
`AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`; it imports nothing but transformers, so it
works without z2all installed. Without `trust_remote_code` the same directory loads as a plain
`PreTrainedTokenizerFast` (see z2all/tokenizer/hf.py for what each path guarantees).

Special-token policy (the class manages it itself):
- a plain call never turns the text "<|im_end|>" (or any special string) into a special id: the saved
  config sets `split_special_tokens=True`; pass `split_special_tokens=False` to a call to opt in;
- `apply_chat_template(messages, tokenize=True)` builds the ids structurally, ChatML style:
  `<|im_start|>` + text(role + "\\n" + content) + `<|im_end|>` + text("\\n") per message, where the special
  ids are inserted by id and every piece of text is encoded with special strings split, so message
  contents cannot inject a control token. The ids equal what the saved `chat_template` string gives when
  its specials are parsed and the contents hold no special string (tested). With `tokenize=False` the
  template string is rendered as usual (for display).
"""

from __future__ import annotations

import json
import os
import shutil

from transformers import BatchEncoding, PreTrainedTokenizerFast

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


class Z2allTokenizer(PreTrainedTokenizerFast):
    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    slow_tokenizer_class = None

    # No __init__ here on purpose: transformers 5.x rebuilds the backend from vocab/merges alone (dropping our
    # pre-tokenizer) for subclasses that define one. The safe default comes from tokenizer_config.json
    # (`split_special_tokens: true`), which `save_pretrained` below always keeps.

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers 5.x writes `tokenizer_class: "TokenizersBackend"`, which 4.x cannot import; restore the
        name both read, our auto_map and the safe default, and ship this file, so a re-saved directory
        loads exactly like the original."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "tokenizer_config.json")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_z2all.Z2allTokenizer"]}
        cfg["split_special_tokens"] = True
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
        target = os.path.join(save_directory, os.path.basename(__file__))
        if not os.path.exists(target):
            shutil.copyfile(__file__, target)
        return out

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` as plain text: special strings inside it are split like any other text."""
        return self.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []

    def _chat_ids(self, conversation, add_generation_prompt: bool, continue_final_message: bool) -> list[int]:
        start = self.convert_tokens_to_ids(IM_START)
        end = self.convert_tokens_to_ids(IM_END)
        ids: list[int] = []
        for i, message in enumerate(conversation):
            message = dict(message)
            content = message.get("content") or ""
            if not isinstance(content, str):
                raise ValueError("Z2allTokenizer chat messages need string content")
            ids.append(start)
            ids.extend(self.encode_text(f"{message['role']}\n{content}"))
            if continue_final_message and i == len(conversation) - 1:
                return ids
            ids.append(end)
            ids.extend(self.encode_text("\n"))
        if add_generation_prompt:
            ids.append(start)
            ids.extend(self.encode_text("assistant\n"))
        return ids

    def apply_chat_template(self, conversation, tools=None, documents=None, chat_template=None,
                            add_generation_prompt=False, continue_final_message=False, tokenize=True,
                            padding=False, truncation=False, max_length=None, return_tensors=None,
                            return_dict=False, **kwargs):
        if not tokenize:
            return super().apply_chat_template(
                conversation, tools=tools, documents=documents, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                tokenize=False, **kwargs)
        if tools or documents or chat_template is not None:
            raise ValueError("Z2allTokenizer tokenizes its own ChatML layout only; for tools, documents or another "
                             "template render with tokenize=False and encode the parts yourself")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        convs = conversation if batched else [conversation]
        all_ids = [self._chat_ids(c, add_generation_prompt, continue_final_message) for c in convs]
        if truncation and max_length is not None:
            all_ids = [ids[:max_length] for ids in all_ids]
        if not return_dict and return_tensors is None and not padding:
            return all_ids if batched else all_ids[0]
        enc = {"input_ids": all_ids if batched else all_ids[0]}
        if padding:
            return self.pad(enc, padding=padding, max_length=max_length, return_tensors=return_tensors)
        enc["attention_mask"] = [[1] * len(x) for x in all_ids] if batched else [1] * len(all_ids[0])
        out = BatchEncoding(enc, tensor_type=return_tensors)
        return out if return_dict else out["input_ids"]
