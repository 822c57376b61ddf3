"""Generated code in service/likeness/serve/pb is exactly what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    gen_proto.generate(tmp_path)
    stale = gen_proto.differs(tmp_path, REPO / "service" / "likeness" / "serve" / "pb")
    assert not stale, f"service/likeness/serve/pb is out of date ({stale}); run: python scripts/gen_proto.py"


def test_contract_has_the_promised_rpcs():
    from likeness.serve.pb import likeness_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name["Likeness"]
    assert pb.DESCRIPTOR.package == "likeness.v1"
    want = {"CreateCharacter", "GetCharacter", "ListCharacters", "DeleteCharacter", "StartBuild", "GetBuild",
            "ListBuilds", "CancelBuild", "WatchBuild", "Generate", "ScoreConsistency", "Curate", "GetEmbedding",
            "GetReport"}
    assert want <= {m.name for m in svc.methods}
    assert svc.methods_by_name["WatchBuild"].server_streaming
    assert svc.methods_by_name["Generate"].server_streaming
    assert "after_event" in pb.WatchBuildRequest.DESCRIPTOR.fields_by_name
