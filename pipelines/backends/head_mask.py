"""Which attention heads to disable: the value type shared by the CLI, jobs and the service.

Disabling follows Michel et al. (2019) and Kovaleva et al. (2019): a disabled head's attention
probabilities are multiplied by 0. Backends that can do it declare
:attr:`~pipelines.backends.base.Capability.HEAD_MASKING`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.config import ConfigError


@dataclass(frozen=True)
class HeadMask:
    """A set of disabled heads: ``(layer, head)`` pairs, ``(layer, None)`` for a whole layer.

    The text form is ``"3.5,3.7,0.*"``: comma-separated ``layer.head`` entries, 0-based, with
    ``*`` for all heads of a layer. The empty mask disables nothing.
    """

    entries: frozenset[tuple[int, int | None]] = frozenset()

    @classmethod
    def parse(cls, text: str, num_layers: int | None = None,
              num_heads: int | None = None) -> HeadMask:
        """Parse the text form; with the model's sizes, also check every entry is in range."""
        entries: set[tuple[int, int | None]] = set()
        if text.strip():
            for raw in text.split(","):
                entries.add(_parse_entry(raw.strip(), text))
        mask = cls(frozenset(entries))
        if num_layers is not None and num_heads is not None:
            mask.validate(num_layers, num_heads)
        return mask

    @classmethod
    def of(cls, *heads: tuple[int, int]) -> HeadMask:
        """The mask disabling the given ``(layer, head)`` pairs."""
        return cls(frozenset((int(layer), int(head)) for layer, head in heads))

    def validate(self, num_layers: int, num_heads: int) -> None:
        """Raise ConfigError if an entry names a layer or head the model does not have."""
        for layer, head in sorted(self.entries, key=_entry_key):
            entry = _entry_text(layer, head)
            if not 0 <= layer < num_layers:
                raise ConfigError(
                    f"disabled head {entry!r}: layer {layer} is out of range; the model has "
                    f"layers 0-{num_layers - 1}"
                )
            if head is not None and not 0 <= head < num_heads:
                raise ConfigError(
                    f"disabled head {entry!r}: head {head} is out of range; each layer has "
                    f"heads 0-{num_heads - 1}"
                )

    def pairs(self, num_heads: int) -> list[tuple[int, int]]:
        """The disabled ``(layer, head)`` pairs, whole layers expanded, sorted."""
        out: set[tuple[int, int]] = set()
        for layer, head in self.entries:
            out.update([(layer, head)] if head is not None else
                       [(layer, h) for h in range(num_heads)])
        return sorted(out)

    def as_tensor(self, num_layers: int, num_heads: int) -> torch.Tensor:
        """[L, H] float32: 1 for a kept head, 0 for a disabled one."""
        self.validate(num_layers, num_heads)
        keep = torch.ones(num_layers, num_heads)  # [L, H]
        for layer, head in self.pairs(num_heads):
            keep[layer, head] = 0.0
        return keep

    def __str__(self) -> str:
        return ",".join(_entry_text(*entry) for entry in sorted(self.entries, key=_entry_key))


def _parse_entry(entry: str, text: str) -> tuple[int, int | None]:
    layer, dot, head = entry.partition(".")
    if not entry:
        raise ConfigError(f"disabled heads {text!r}: empty entry; use e.g. 3.5,3.7,0.*")
    if not dot or not _is_index(layer) or not (head == "*" or _is_index(head)):
        raise ConfigError(
            f"disabled heads {text!r}: entry {entry!r} is not layer.head (0-based integers, "
            "'*' for all heads of a layer), e.g. 3.5 or 0.*"
        )
    return int(layer), None if head == "*" else int(head)


def _is_index(text: str) -> bool:
    return text.isascii() and text.isdecimal()


def _entry_text(layer: int, head: int | None) -> str:
    return f"{layer}.{'*' if head is None else head}"


def _entry_key(entry: tuple[int, int | None]) -> tuple[int, int]:
    return entry[0], -1 if entry[1] is None else entry[1]

