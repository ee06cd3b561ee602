"""An SGLang ``ChatTemplate`` derived from the model's own Jinja chat template.

SGLang's frontend builds chat prompts from per-role (prefix, suffix) pairs. Rather than
guess a template from the model's name, we render the tokenizer's template around
sentinel contents and cut the pieces out, then check that the pieces reproduce the
tokenizer's own rendering. If they do not (templates that merge roles, say), SGLang's
name-based lookup is used instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

from sglang.lang.chat_template import (ChatTemplate, chat_template_registry, get_chat_template,
                                       get_chat_template_by_model_path)

logger = logging.getLogger(__name__)

_MARK = {"system": "\x1eSYS\x1e", "user": "\x1eUSR\x1e", "assistant": "\x1eAST\x1e"}


def chat_template_for(tokenizer, name: str) -> ChatTemplate:
    derived = _derive(tokenizer, name)
    if derived is not None:
        return derived
    logger.info("chat template of %s not derivable; using SGLang's lookup by name", name)
    return get_chat_template_by_model_path(name)


def server_chat_template(model_info: Dict[str, Any]) -> ChatTemplate:
    """The chat template a client should build a server's prompts with (``/get_model_info``).

    SGLang's ``RuntimeEndpoint`` picks one by the model path's name, which for a local
    folder of a model it does not know is its ``default`` template (``SYSTEM:``/``USER:``
    lines), not the model's own; the embedded engine uses the model's own, so the same
    program would prompt the two backends differently. In order: the template the server
    names as exact (``rksc-sgl serve``'s ``chat_template_name``), the model's own template when its
    folder is readable here, SGLang's lookup by name.
    """
    named = model_info.get("chat_template_name")
    if named and named in chat_template_registry and model_info.get("chat_template_exact", True):
        return get_chat_template(named)
    path = str(model_info.get("model_path") or "")
    if path and Path(path).is_dir():
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            logger.info("no tokenizer readable in %s; using SGLang's chat template lookup by name", path)
        else:
            return chat_template_for(tokenizer, path)
    return get_chat_template_by_model_path(path)


def _render(tokenizer, roles, generation_prompt=False) -> str:
    messages = [{"role": r, "content": _MARK[r]} for r in roles]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _derive(tokenizer, name: str) -> Optional[ChatTemplate]:
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        full = _render(tokenizer, ["system", "user", "assistant"])
        sys_only = _render(tokenizer, ["system"])
        sys_user_gen = _render(tokenizer, ["system", "user"], generation_prompt=True)
        user_only = _render(tokenizer, ["user"])
    except Exception:  # template raises for role orders it does not support
        return None
    s, u, a = (_MARK[r] for r in ("system", "user", "assistant"))
    if not all(m in full for m in (s, u, a)) or s not in sys_only:
        return None
    sys_prefix, rest = full.split(s, 1)
    sys_suffix = sys_only.split(s, 1)[1]
    between_su, rest = rest.split(u, 1)
    between_ua, ast_suffix = rest.split(a, 1)
    if not between_su.startswith(sys_suffix):
        return None
    user_prefix = between_su[len(sys_suffix) :]
    after_user = sys_user_gen.split(u, 1)[1]
    # after_user = user_suffix + assistant_prefix; between_ua is the same text.
    if after_user != between_ua:
        return None
    user_suffix, ast_prefix = _split_suffix_prefix(between_ua, sys_suffix)
    roles = {
        "system": (sys_prefix, sys_suffix),
        "user": (user_prefix, user_suffix),
        "assistant": (ast_prefix, ast_suffix),
    }
    default_system = _default_system_prompt(user_only, roles)
    template = ChatTemplate(name=f"derived:{name}", default_system_prompt=default_system, role_prefix_and_suffix=roles)
    rebuilt = template.get_prompt(
        [{"role": "system", "content": s}, {"role": "user", "content": u}, {"role": "assistant", "content": a}]
    )
    return template if rebuilt == full else None


def _split_suffix_prefix(between: str, sys_suffix: str):
    """Split the text between a user turn and an assistant turn.

    Templates close every turn the same way, so the user suffix is the system suffix
    when that matches; otherwise the whole text is treated as the assistant prefix.
    """
    if between.startswith(sys_suffix):
        return sys_suffix, between[len(sys_suffix) :]
    return "", between


def _default_system_prompt(user_only: str, roles) -> Optional[str]:
    """The system text a template inserts when a conversation starts with a user turn."""
    sys_prefix, sys_suffix = roles["system"]
    user_prefix = roles["user"][0]
    head = user_only.split(_MARK["user"], 1)[0]
    if not head.startswith(sys_prefix) or not head.endswith(sys_suffix + user_prefix) or not sys_prefix:
        return None
    content = head[len(sys_prefix) : len(head) - len(sys_suffix + user_prefix)]
    return content or None
