"""The pipeline core without Ray or I/O."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from stages.model import Envelope, Outcome, Verdict
from stages.pipeline import Pipeline, StageError
from stages.ports import Ports
from stages.resolver import ConfigError, Resolver, StageRegistry, UnknownType


def env(i: int, **fields: object) -> Envelope:
    return Envelope(type="chat", id=f"c{i}", sender="alice", fields=dict(fields))


class Recorder:
    def __init__(self, name: str, verdicts: dict[str, Verdict] | None = None) -> None:
        self.name = name
        self.verdicts = verdicts or {}
        self.seen: list[list[str]] = []

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        self.seen.append([e.id for e in batch])
        out = []
        for e in batch:
            v = self.verdicts.get(e.id, Verdict.CONTINUE)
            out.append(Outcome(v, e, code=None if v is Verdict.CONTINUE else "x"))
        return out


async def test_settled_items_skip_later_stages_and_keep_their_outcome() -> None:
    first = Recorder("first", {"c1": Verdict.REJECT, "c2": Verdict.DROP})
    second = Recorder("second", {"c3": Verdict.DONE})
    third = Recorder("third")
    outcomes = await Pipeline([first, second, third]).run([env(i) for i in range(5)])
    assert [o.verdict for o in outcomes] == [
        Verdict.CONTINUE, Verdict.REJECT, Verdict.DROP, Verdict.DONE, Verdict.CONTINUE]
    assert first.seen == [["c0", "c1", "c2", "c3", "c4"]]
    assert second.seen == [["c0", "c3", "c4"]]
    assert third.seen == [["c0", "c4"]]


async def test_a_stage_returning_the_wrong_number_of_outcomes_is_an_error() -> None:
    class Broken:
        name = "broken"

        async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
            return []

    with pytest.raises(StageError, match="broken"):
        await Pipeline([Broken()]).run([env(1)])


async def test_stops_early_when_nothing_is_left() -> None:
    first = Recorder("first", {"c0": Verdict.REJECT})
    second = Recorder("second")
    await Pipeline([first, second]).run([env(0)])
    assert second.seen == []


def registry() -> StageRegistry:
    reg = StageRegistry()
    for name in ("a", "b", "c"):
        reg.register(name, lambda opts, ports, name=name: Recorder(name))
    return reg


YAML = """
types:
  chat:
    durable: true
    cost: 2
    stages: [a, {b: {limit: 3}}, c]
    variants:
      - when: {meta.chat_kind: broadcast}
        stages: [a, c]
  typing:
    stages: [c]
"""


def test_resolver_reads_types_stages_options_and_variants() -> None:
    res = Resolver.from_yaml(YAML, registry())
    chat = res.spec("chat")
    assert chat.durable and chat.overflow == "block" and chat.cost == 2
    assert [s.name for s in chat.stages] == ["a", "b", "c"]
    assert chat.stages[1].options == {"limit": 3}
    typing = res.spec("typing")
    assert not typing.durable and typing.overflow == "drop"
    broadcast = Envelope(type="chat", id="1", sender="s", meta={"chat_kind": "broadcast"})
    assert chat.route(broadcast) == 0
    assert [s.name for s in chat.stages_for(0)] == ["a", "c"]
    assert chat.route(env(1)) == -1
    pipe = res.pipeline("chat", registry(), Ports(), route=0)
    assert pipe.names == ["a", "c"]
    with pytest.raises(UnknownType):
        res.spec("nope")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("types: {chat: {stages: [zzz]}}", "unknown stage 'zzz'"),
        ("types: {chat: {durable: true, overflow: drop, stages: [a]}}", "never dropped"),
        ("types: {chat: {stages: []}}", "non-empty list"),
        ("types: {chat: {overflow: sideways, stages: [a]}}", "overflow"),
        ("nothing: here", "top-level 'types'"),
        ("types: {chat: {cost: -1, stages: [a]}}", "cost"),
    ],
)
def test_resolver_rejects_bad_configuration(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        Resolver.from_yaml(text, registry())


def test_shipped_pipelines_yaml_is_valid() -> None:
    from serve_app.bootstrap import load_resolver
    from settings import Settings

    res = load_resolver(Settings())
    assert res.spec("chat").durable
    assert [s.name for s in res.spec("chat").stages][1:3] == ["validate_chat", "persist_chat"]
    assert not res.spec("signal").durable and not res.spec("presence").client
