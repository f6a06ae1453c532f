"""Credentials in a URI never reach anything the project writes or prints: not the output's metadata, `_run.json`,
markers, progress or report, not the console, not an error. Every file of the output and all captured output are
searched for the secret."""

from __future__ import annotations

import pytest

from recaption.cli import main
from recaption.redact import redact_text, strip_credentials
from tests.data import write_webdataset_dir

SECRET = "s3cr3tVALUE9f"
KEY = "AKIAEXAMPLEKEY7"


@pytest.mark.parametrize(
    "uri, kept, gone",
    [
        (f"s3://{KEY}:{SECRET}@bucket/in?region=us-east-1", "s3://bucket/in?region=us-east-1", [KEY, SECRET]),
        (f"s3://bucket/in?access_key={KEY}&secret_key={SECRET}&scheme=http", "s3://bucket/in?scheme=http", [SECRET]),
        (f"gs://b/x?session_token={SECRET}", "gs://b/x", [SECRET]),
        (f"https://h/x.tar?X-Amz-Credential={KEY}&X-Amz-Signature={SECRET}&X-Amz-Date=1", "https://h/x.tar?X-Amz-Date=1",
         [KEY, SECRET]),
        ("/local/path/with=equals", "/local/path/with=equals", []),
    ],
)  # fmt: skip
def test_strip_credentials_and_redact_text(uri, kept, gone):
    assert strip_credentials(uri) == kept
    text = redact_text(f"error: cannot read {uri}: password={SECRET}")
    assert all(g not in text for g in gone) and SECRET not in text


def everything_written(root) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in sorted(root.rglob("*")) if p.is_file())


def test_no_secret_in_the_output_or_the_console(tmp_path, ray_session, s3_endpoint, capfd):
    write_webdataset_dir(f"s3://bucket/secrets/in?{s3_endpoint}", 4, 2)
    src = f"s3://{KEY}:{SECRET}@bucket/secrets/in?{s3_endpoint}"  # pyarrow takes S3 credentials as user-info
    config = tmp_path / "p.yaml"
    config.write_text(f"input: {{path: '{src}'}}\noutput: {{path: {tmp_path / 'out'}}}\n"
                      "models: [{path: fake, engine: fake, prompts: [short], num_cpus: 0.25}]\n")  # fmt: skip
    assert main(["run", str(config)]) == 0
    assert main(["report", str(tmp_path / "out")]) == 0
    o2 = f"output.path={tmp_path / 'o2'}"
    missing = src.replace("/in?", "/nowhere?")
    assert main(["run", str(config), "--set", f"input.path={missing}", "--set", o2]) == 2
    # Credentials as query parameters, which pyarrow refuses for S3: the error shows the URI, redacted.
    query = f"s3://bucket/secrets/in?access_key={KEY}&secret_key={SECRET}&{s3_endpoint}"
    assert main(["run", str(config), "--set", f"input.path={query}", "--set", o2]) == 2
    captured = capfd.readouterr()
    written = everything_written(tmp_path / "out")
    assert "config_hash" in written and (tmp_path / "out" / "_report" / "index.html").is_file()
    assert "s3://bucket/secrets/in?endpoint_override" in written  # the input is still named, credentials stripped
    for text in (written, captured.out, captured.err):
        assert SECRET not in text and KEY not in text
    assert "not found: s3://bucket/secrets/nowhere" in captured.err
    assert "s3://bucket/secrets/in?endpoint_override" in captured.err  # named, its secret parameters left out
