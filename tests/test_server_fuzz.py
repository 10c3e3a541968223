"""Property-based fuzzing of the API with schemathesis against the app's own OpenAPI schema
(GET /openapi.json): valid and invalid requests generated from the schema for every route; no
response may be a 5xx, and every response must match what the schema documents (status code,
content type, body schema, headers). In-process (ASGI), over a scripted engine, ~50 examples a
route so the whole run stays within tens of seconds."""

import pytest
from server_fakes import FakeEngine, tiny_tokenizer

from nanochat.server import create_app

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e '.[dev]')")
from hypothesis import HealthCheck, settings  # noqa: E402  (hypothesis comes with schemathesis)
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

tok = tiny_tokenizer()
# schemathesis's in-process client sends Host: testserver; max_tokens small so each reply is quick
app = create_app([FakeEngine(tok)], tok, model_name="nanochat-fuzz", allowed_hosts=["testserver"], max_tokens=8)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    # Every check but positive_data_acceptance: the schema states types, not the limits a 400
    # enforces (the last message must be the user's, 32,000 characters in all, the model's
    # context), so a schema-valid request may rightly be refused.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
