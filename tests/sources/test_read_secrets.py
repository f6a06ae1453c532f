"""Credentials in input and DEST URIs never show in what the readers, the planner, export and inspect say or write;
export and inspect find the source images of an output on S3 with credentials from the environment (the run
metadata keeps the input path without them)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import pytest

from recaption.cli import main
from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.sources import fs
from recaption.sources.plan import plan_units
from recaption.sources.read import read_unit
from tests.data import write_webdataset_dir
from tests.job.test_pipeline import make_config

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def secret_uris(path: str, endpoint: str) -> list[str]:
    """`s3://bucket/<path>` with the secret in user-info and in each kind of secret query parameter."""
    return [
        f"s3://AKIDEXAMPLE:{SECRET}@bucket/{path}?{endpoint}",
        f"s3://bucket/{path}?access_key=AKIDEXAMPLE&secret_key={SECRET}&{endpoint}",
        f"s3://bucket/{path}?{endpoint}&session_token={SECRET}",
        f"s3://bucket/{path}?{endpoint}&X-Amz-Signature={SECRET}",
    ]


def test_planner_and_reader_errors_and_logs_never_show_credentials(s3_endpoint, tmp_path, caplog):
    write_webdataset_dir(f"s3://bucket/secrets/in?{s3_endpoint}", 4, 2)
    with caplog.at_level(logging.DEBUG):
        cfg = InputConfig(path=f"s3://AKIDEXAMPLE:{SECRET}@bucket/secrets/in?{s3_endpoint}")
        units = plan_units(cfg)  # user-info credentials work (the local S3 accepts any)
        assert [r.key for u in units for r in read_unit(u, cfg)] == [f"{i:09d}" for i in range(4)]
        assert SECRET not in units[0].unit + units[0].source
        messages = []
        for uri in secret_uris("secrets/nope", s3_endpoint) + secret_uris("secrets/in", s3_endpoint)[1:]:
            with pytest.raises(InputError) as e:
                plan_units(InputConfig(path=uri))
            messages.append(str(e.value))
        gone = units[1].__class__(**{**units[1].to_dict(), "uri": units[1].uri.replace("00001.tar", "gone.tar")})
        with pytest.raises(InputError) as e:
            list(read_unit(gone, cfg))
        messages.append(str(e.value))
    assert "input path not found: s3://bucket/secrets/nope?endpoint_override=" in messages[0]
    assert "input path not found: s3://bucket/secrets/in/gone.tar?" in messages[-1]
    assert all(SECRET not in m for m in messages), messages
    assert SECRET not in caplog.text


def test_retry_warnings_and_their_last_error_never_show_credentials(monkeypatch, caplog):
    monkeypatch.setattr(fs, "RETRY_BASE_S", 0.0)
    for uri in secret_uris("secrets/x.tar", "endpoint_override=127.0.0.1:1&scheme=http"):

        def reset(uri: str = uri) -> None:
            raise OSError(f"curl error: Connection reset by peer while reading {uri}")

        with caplog.at_level(logging.WARNING), pytest.raises(fs.Unreachable) as e:
            fs.retrying(reset, uri, "read")
        assert "Connection reset by peer" in str(e.value) and SECRET not in str(e.value)
    assert caplog.text.count("attempt 1 of 5") == 4 and SECRET not in caplog.text


@pytest.fixture(scope="module")
def s3_output(tmp_path_factory, ray_session, s3_endpoint) -> tuple[Path, str]:
    """A real run (fake engine) over tars on S3, given with the secret in user-info; the output is local."""
    from recaption.job.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("secrets")
    write_webdataset_dir(f"s3://bucket/secret-run/in?{s3_endpoint}", 5, 3)
    source = f"s3://AKIDEXAMPLE:{SECRET}@bucket/secret-run/in?{s3_endpoint}"
    run_pipeline(make_config(source, root / "out"), progress=False)
    return root, s3_endpoint


def test_export_and_inspect_find_the_images_with_environment_credentials(s3_output, capfd, caplog):
    root, endpoint = s3_output
    out = str(root / "out")
    with caplog.at_level(logging.INFO):
        code, stdout, stderr = cli("export", out, "--to", "webdataset", str(root / "wds"))
        assert (code, stderr) == (0, "") and "exported 5 rows" in stdout
        code, stdout, stderr = cli("inspect", out, "--key", "000000003", "--out", str(root / "look"))
        assert (code, stderr) == (0, "") and (root / "look" / "000000003.png").exists()
        errors = []
        for dest in secret_uris("secret-run/in", endpoint):  # a DEST that holds the input: not empty
            errors.append(cli("export", out, "--to", "webdataset", dest))
        for moved in secret_uris("secret-run/moved", endpoint):
            errors.append(cli("inspect", out, "--key", "000000003", "--input", moved, "--out", str(root / "x")))
    assert [code for code, _, _ in errors] == [2] * 8
    assert all("s3://bucket/secret-run/" in err and err.count("\n") == 1 for _, _, err in errors), errors
    assert all(SECRET not in out + err for _, out, err in errors)
    written = [p for p in root.rglob("*") if p.is_file()]
    assert len(written) > 10 and not [p for p in written if SECRET.encode() in p.read_bytes()]
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text
