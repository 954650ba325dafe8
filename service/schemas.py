"""Request and response models of the HTTP API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from pipelines.analysis import registry
from pipelines.config import (
    WORD_ROWS,
    AttentionMode,
    ConfigError,
    check_choice,
    parse_entropy_epsilon,
)
from pipelines.dataset import schema
from pipelines.text.punctuation import DEFAULT_RULE, RULES, punctuation_rule
from pipelines.text.tokenize import Document, clean_pair, clean_text, is_blank

ARROW_STREAM = "application/vnd.apache.arrow.stream"


def request_analyses() -> tuple[str, ...]:
    """Analyses a request may ask for: those the registry offers to the service (read at
    request time, so analyses that plugins register count)."""
    return registry.service_names()


def request_tables() -> tuple[str, ...]:
    """Tables a request may name in ``table``: the core tables and those of the requestable
    analyses (partial tables excluded)."""
    tables = [*schema.TABLES]
    for analysis in registry.selected(request_analyses()):
        tables += [spec.name for spec in analysis.tables if not spec.hidden]
    return tuple(tables)


def _options(names: tuple[str, ...]) -> str:
    return ", ".join(repr(name) for name in names)


#: A text with at least one non-space character (the input rule's ``clean_text``: leading
#: byte-order marks go, blank is refused with "text is blank").
Text = Annotated[str, Field(min_length=1), AfterValidator(clean_text)]
#: The second text of a pair (``clean_pair``): empty or blank is no pair.
Pair = Annotated[str | None, AfterValidator(clean_pair)]


def _user_error(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``check`` with its ``ConfigError`` as the ``ValueError`` pydantic reports (422)."""
    def run(value: Any) -> Any:
        try:
            return check(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    return run


def _known_rule(name: str) -> str:
    punctuation_rule(name)
    return name


def _known_word_rows(name: str) -> str:
    check_choice("word rows", name, WORD_ROWS)
    return name


#: A punctuation rule's name (``pipelines.text.punctuation``).
Punctuation = Annotated[str, AfterValidator(_user_error(_known_rule))]
#: ε of the entropy smoothing: a number in [0, 1) or a name (``parse_entropy_epsilon``).
EntropyEpsilon = Annotated[float, BeforeValidator(_user_error(parse_entropy_epsilon))]
#: How a word's row merges its pieces' rows (``pipelines.config.WORD_ROWS``).
WordRows = Annotated[str, AfterValidator(_user_error(_known_word_rows))]


class InputItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text
    id: str | None = Field(None, min_length=1, max_length=256)
    text_pair: Pair = None


class AttentionRequest(BaseModel):
    """POST /v1/attention. Give ``texts`` or ``inputs``, not both."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"texts": ["The cat sat on the mat."], "attention": "topk:4", "layers": [0, 5]}]})

    texts: list[str] | None = None
    inputs: list[InputItem] | None = None
    model: str | None = Field(None, description="a configured model name (GET /v1/models)")
    layers: list[int] | None = Field(None, description="keep only these layers")
    heads: list[int] | None = Field(None, description="keep only these heads")
    attention: str = Field("topk:8", description="none, topk:K, threshold:T or full")
    statistics: bool = Field(True, description="return head_stats")
    max_length: int | None = Field(None, ge=2)
    stride: int = Field(64, ge=0)
    truncate: bool = False
    local_window: int = Field(2, ge=0, le=64)
    punctuation: Punctuation = Field(
        DEFAULT_RULE, description=f"keys mass_punct counts (tokens.is_punct): {' or '.join(RULES)}"
                                  " (only '.' and ',', as Clark et al. 2019)")
    entropy_epsilon: EntropyEpsilon = Field(
        0.0, description="entropy of A' = (1 - e) A + e/n: e in [0, 1), or \"clark\" (1e-4, "
                         "Clark et al. 2019)")
    word_rows: WordRows = Field(
        "mean", description="words analysis: a word's row is the mean of its pieces' rows, "
                            "or 'first' (its first piece's row)")
    analyses: list[str] = Field(
        [], description="also return the tables of these analyses, e.g. head_patterns "
                        "(patterns) and words + word_attention (words)")
    disable_heads: str | None = Field(
        None, description='heads to disable in the forward pass, e.g. "3.5,3.7" or "0.*"')
    store: bool = Field(False, description="also append the results to the service dataset")
    table: str = Field("head_stats", description="the table sent when Accept asks for Arrow")
    layout: Literal["rows", "dense"] = Field(
        "rows", description="JSON attention: 'rows' (one object per kept weight) or 'dense' "
                            "(per window, weights[layer][head][query][key], 0 where not kept)")

    @field_validator("analyses")
    @classmethod
    def _requestable(cls, values: list[str]) -> list[str]:
        offered = request_analyses()
        unknown = [name for name in values if name not in offered]
        if unknown:
            raise ValueError(f"unknown analysis {_options(tuple(unknown))}: use one of "
                             f"{_options(offered)}")
        return values

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        tables = request_tables()
        if value not in tables:
            raise ValueError(f"Input should be {_options(tables)}")
        return value

    @field_validator("attention")
    @classmethod
    def _mode(cls, value: str) -> str:
        try:
            return str(AttentionMode.parse(value))
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _one_source(self) -> AttentionRequest:
        if (self.texts is None) == (self.inputs is None):
            raise ValueError("give either 'texts' (a list of strings) or 'inputs', not both")
        if self.texts is not None:
            blank = [i for i, t in enumerate(self.texts) if is_blank(t)]
            if blank:
                raise ValueError(f"texts {blank} are empty; every text needs content")
        if not self.items():
            raise ValueError("no texts given; send at least one")
        ids = [item.id for item in self.items() if item.id is not None]
        if len(ids) != len(set(ids)):
            raise ValueError("input ids must be unique within a request")
        return self

    @model_validator(mode="after")
    def _store_keeps_one_convention(self) -> AttentionRequest:
        defaults = (DEFAULT_RULE, 0.0, "mean")
        if self.store and (self.punctuation, self.entropy_epsilon, self.word_rows) != defaults:
            raise ValueError("store: the service dataset keeps the default conventions; send "
                             "punctuation, entropy_epsilon and word_rows at their defaults, or "
                             "leave store off")
        return self

    @model_validator(mode="after")
    def _store_keeps_everything(self) -> AttentionRequest:
        """A stored dataset is appended to by many requests under one manifest, so every part
        holds all layers, heads and head_stats: selections cannot be stored."""
        chosen = [name for name, on in (("layers", self.layers is not None),
                                        ("heads", self.heads is not None),
                                        ("statistics", not self.statistics)) if on]
        if self.store and chosen:
            raise ValueError(f"store keeps every layer, head and head_stats row (one dataset, "
                             f"one manifest); drop {', '.join(chosen)} to store, or leave "
                             "store off to get the selection")
        return self

    def items(self) -> list[InputItem]:
        if self.inputs is not None:
            return self.inputs
        return [InputItem(text=t) for t in self.texts or []]

    def location(self, index: int) -> str:
        """Where item ``index`` is in the request, e.g. ``inputs.2``."""
        return f"{'texts' if self.texts is not None else 'inputs'}.{index}"

    def documents(self, request_id: str) -> list[Document]:
        """The documents of the request (ids made from ``request_id`` where none is given),
        through the same input rule as a corpus job's files."""
        items = self.items()
        width = len(str(len(items) - 1))  # zero-padded, so ids sort in request order
        return [Document(item.id or f"request-{request_id}:{index:0{width}d}", item.text,
                         item.text_pair, source="http", source_line=index)
                for index, item in enumerate(items)]


class ViewRequest(BaseModel):
    """POST /v1/view: one text (or sentence pair) → a self-contained HTML attention view."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"text": "The cat sat on the mat.", "text_pair": "It was happy."}]})

    text: Text
    text_pair: Pair = None
    id: str = Field("view", min_length=1, max_length=256)
    model: str | None = Field(None, description="a configured model name (GET /v1/models)")
    attention: str = Field("topk:8", description="weights to draw: topk:K, threshold:T or full")
    max_length: int | None = Field(None, ge=2)
    stride: int = Field(64, ge=0)
    truncate: bool = False
    qk: bool | None = Field(None, description="query/key vectors for the neuron view (default: "
                                              "when the model runs on the torch backend)")

    @field_validator("attention")
    @classmethod
    def _drawable(cls, value: str) -> str:
        try:
            mode = AttentionMode.parse(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if mode.kind == "none":
            raise ValueError("the view draws kept weights: use topk:K, threshold:T or full")
        return str(mode)

    def attention_request(self) -> AttentionRequest:
        """The same document as an attention request (for its limits and windows)."""
        item = InputItem(text=self.text, text_pair=self.text_pair, id=self.id)
        return AttentionRequest(inputs=[item], model=self.model, attention=self.attention,
                                max_length=self.max_length, stride=self.stride,
                                truncate=self.truncate)


class ModelDescription(BaseModel):
    name: str
    model: str
    family: str
    model_type: str
    num_layers: int
    num_heads: int
    max_length: int
    config_hash: str
    runtime: dict
    causal: bool
    #: key/value heads per layer (grouped-query attention: fewer than num_heads)
    num_kv_heads: int
    #: each layer's sliding window, null where a layer sees every key
    layer_windows: list[int | None]
