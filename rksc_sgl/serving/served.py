"""The model a server serves: its names, context length and chat template (the one
``sgl.system``/``sgl.user``/``sgl.assistant`` programs get), and the SGLang template name
``RuntimeEndpoint`` clients should pass to get the same prompts."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, FrozenSet, List


@dataclasses.dataclass(frozen=True)
class ServedModel:
    name: str
    model_dir: str
    context_len: int
    chat_template: Any
    template_info: Dict[str, Any]
    started: int

    @classmethod
    def of(cls, engine) -> "ServedModel":
        return cls(name=engine.get_model_name(), model_dir=str(engine.model_dir), context_len=engine.context_len,
                   chat_template=engine.chat_template, template_info=matching_chat_template(engine),
                   started=int(time.time()))

    @property
    def names(self) -> FrozenSet[str]:
        """What a request's ``model`` may say: the served name or the model folder."""
        return frozenset({self.name, self.model_dir})

    def serves(self, model: str) -> bool:
        return model in self.names

    def card(self) -> Dict[str, Any]:
        """OpenAI's model object (``/v1/models``)."""
        return {"id": self.name, "object": "model", "created": self.started, "owned_by": "rksc-sgl",
                "root": self.model_dir, "max_model_len": self.context_len}


def matching_chat_template(engine) -> Dict[str, Any]:
    """The SGLang chat template name whose role pieces equal the engine's template."""
    from sglang.lang.chat_template import chat_template_registry

    mine = engine.chat_template
    roles = mine.role_prefix_and_suffix
    candidates = [(name, t) for name, t in chat_template_registry.items()
                  if t.role_prefix_and_suffix == roles]
    exact = [name for name, t in candidates if t.default_system_prompt == mine.default_system_prompt]
    if exact:
        return {"chat_template_name": exact[0], "chat_template_exact": True}
    if candidates:
        return {"chat_template_name": candidates[0][0], "chat_template_exact": False}
    return {"chat_template_name": None, "chat_template_exact": False}


def render_chat(template, messages: List[Dict[str, str]]) -> str:
    """The prompt an SGLang chat program builds for ``messages`` with ``template``, ending with
    the assistant prefix (add_generation_prompt): the default system prompt goes first when
    the conversation does not start with a system turn, as the interpreter does."""
    messages = list(messages)
    if messages and messages[0]["role"] != "system" and template.default_system_prompt:
        messages.insert(0, {"role": "system", "content": template.default_system_prompt})
    prompt = template.get_prompt(messages)
    return prompt + template.get_prefix_and_suffix("assistant", messages)[0]
