"""The generated protobuf/gRPC modules match protos/ (regenerate: python -m services.gateway.codegen)."""

from __future__ import annotations

from services.gateway import codegen
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb


def test_generated_code_matches_the_protos() -> None:
    drift = codegen.check()
    assert not drift, f"regenerate with `python -m services.gateway.codegen`: {drift}"


def test_every_rpc_and_message_field_is_documented() -> None:
    text = (codegen.PROTOS / "genfleet/v1/generation.proto").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(text):
        stripped = line.strip()
        is_rpc = stripped.startswith("rpc ")
        is_message = stripped.startswith(("message ", "enum ", "service "))
        if (is_rpc or is_message) and not text[i - 1].strip().startswith("//") \
                and not stripped.endswith("{}"):
            undocumented.append(stripped)
    assert not undocumented, undocumented
    service = pb.DESCRIPTOR.services_by_name["GenerationService"]
    assert {m.name for m in service.methods} == {
        "ListModels", "Generate", "GenerateStream", "Score", "Encode", "Decode"}
