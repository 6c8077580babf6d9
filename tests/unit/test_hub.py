"""Hub persistence, versioning and change events (real SQLite, and a throwaway PostgreSQL for the
store contract)."""

from __future__ import annotations

import pytest

from cmr.errors import HubError
from cmr.hub import HubChange, ModelHub, open_hub_store
from cmr.types import ModelCard


def test_add_update_retire_persist_and_version(tmp_path, store_dsn):
    path = tmp_path / "hub.sqlite"
    hub = ModelHub(open_hub_store(store_dsn, path))
    assert hub.version == 0
    v1 = hub.add([ModelCard(id="a", domain="x", cost=1.0), ModelCard(id="b", domain="y")])
    v2 = hub.update(ModelCard(id="a", domain="x", cost=2.0, description="new"))
    v3 = hub.retire("b")
    assert v1 < v2 < v3 == hub.version

    again = ModelHub(open_hub_store(store_dsn, path))  # reopen: the same live cards and version
    assert again.version == v3
    assert [c.id for c in again.list()] == ["a"]
    assert again.get("a").cost == 2.0 and again.get("a").description == "new"
    assert {c.id for c in again.list(include_retired=True)} == {"a", "b"}
    # a retired id may be registered again
    again.add(ModelCard(id="b"))
    assert "b" in again and again.version == v3 + 1


def test_duplicates_and_unknown_ids_are_refused(tmp_path):
    hub = ModelHub(path=tmp_path / "hub.sqlite")
    hub.add(ModelCard(id="a"))
    with pytest.raises(HubError, match="already registered"):
        hub.add(ModelCard(id="a"))
    with pytest.raises(HubError):
        hub.add([ModelCard(id="c"), ModelCard(id="c")])
    with pytest.raises(HubError, match="unknown"):
        hub.retire("zzz")
    with pytest.raises(HubError, match="unknown"):
        hub.update(ModelCard(id="zzz"))
    assert [c.id for c in hub.list()] == ["a"] and hub.version == 1  # nothing half-applied


def test_listeners_hear_every_change():
    hub = ModelHub()
    seen: list[HubChange] = []
    hub.subscribe(seen.append)
    hub.add(ModelCard(id="a"))
    hub.update(ModelCard(id="a", cost=3.0))
    hub.retire(["a"])
    assert [(c.kind, [x.id for x in c.cards]) for c in seen] == [("added", ["a"]), ("updated", ["a"]), ("retired", ["a"])]
    assert [c.version for c in seen] == [1, 2, 3]


def test_many_cards_round_trip(tmp_path, store_dsn):
    path = tmp_path / "hub.sqlite"
    ModelHub(open_hub_store(store_dsn, path)).add([ModelCard(id=f"m{i:05d}", cost=i / 10, profile={"p1": 0.5}) for i in range(5000)])
    hub = ModelHub(open_hub_store(store_dsn, path))
    cards = hub.list()
    assert len(cards) == 5000 and cards[1234].id == "m01234" and cards[1234].cost == 123.4
    assert cards[0].profile == {"p1": 0.5}


@pytest.mark.parametrize(
    "bad, field",
    [({"id": ""}, "id"), ({"id": "a", "cost": -1}, "cost"), ({"id": "a", "cost": float("nan")}, "cost"),
     ({"id": "a", "profile": {"p": "x"}}, "profile.p"), ({"id": "a", "backend": []}, "backend")],
)
def test_malformed_cards_name_the_field(bad, field):
    with pytest.raises(HubError, match=field):
        ModelCard.from_dict(bad)


def test_card_dict_round_trip_and_text():
    card = ModelCard(id="Helsinki-NLP/opus-mt-es-en", family="opus", domain="Translation", description="Spanish to English.",
                     cost=0.5, backend={"engine": "transformers"}, profile={"q1": 1.0}, experience=2, metadata={"x": 1})
    assert ModelCard.from_dict(card.to_dict()) == card
    assert card.text() == "Helsinki NLP opus mt es en. Translation. Spanish to English."
    # the shared data's key "model" is accepted as the id, unknown keys kept in metadata
    c = ModelCard.from_dict({"model": "m", "framework": "pt"})
    assert c.id == "m" and c.metadata == {"framework": "pt"}
