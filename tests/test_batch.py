"""Batch files without a broker: parsing, validation, derived ids, results, exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.kit.samples import VENDOR_REQUIRED
from worker.cli import app
from worker.contract import errors
from worker.contract.messages import fingerprint
from worker.contract.models import RedirectCommand
from worker.produce.batch import (
    Batch,
    BatchCommand,
    BatchFileError,
    BatchRun,
    CommandResult,
    PlainProgress,
    derive_command_id,
    load_batch,
    parse_batch,
    run_batch,
    write_results,
)
from worker.produce.producer import Outgoing, PublishReport

VENDOR = VENDOR_REQUIRED
HEADER = ",".join(VENDOR)


def csv_text(*rows: str, header: str = HEADER) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


def row(**changes: str) -> str:
    values = {**VENDOR, **changes}
    return ",".join(f'"{v}"' if ";" in v or "," in v or "\n" in v else v for v in values.values())


def jsonl(*commands: Any) -> bytes:
    return b"".join((c if isinstance(c, str) else json.dumps(c)).encode() + b"\n" for c in commands)


def whole(**changes: Any) -> dict[str, Any]:
    return {"type": "redirect", "version": 1, "redirect": {**VENDOR}, **changes}


pytestmark = pytest.mark.usefixtures("clean_worker_env")


# -- CSV -------------------------------------------------------------------------------


def test_csv_rows_become_commands_with_vendor_fields() -> None:
    batch = parse_batch(csv_text(row(), row(ID_CHAMADA="call-2", PRIORIDADE="19")), "csv")
    assert batch.errors == [] and batch.rows == 2 and len(batch.commands) == 2
    body = json.loads(batch.commands[0].body)
    assert body == {"command_id": batch.commands[0].command_id, **whole()}
    assert RedirectCommand.model_validate(body).redirect.PRIORIDADE == "0"
    assert batch.commands[1].line == 3


def test_optional_columns_and_empty_cells() -> None:
    header = HEADER + ",TEMPO_FILA,command_id,expires_at,channel_id,pabx"
    batch = parse_batch(
        csv_text(
            row() + ",23,id-1,2030-01-01T00:00:00Z,17,filial_sp",
            row(ID_CHAMADA="c2") + ",,,,,",
            header=header,
        ),
        "csv",
    )
    assert batch.errors == []
    first, second = (json.loads(c.body) for c in batch.commands)
    assert first["command_id"] == "id-1" and first["channel_id"] == 17
    assert first["pabx"] == "filial_sp" and first["expires_at"] == "2030-01-01T00:00:00Z"
    assert first["redirect"]["TEMPO_FILA"] == "23"
    assert "TEMPO_FILA" not in second["redirect"] and "channel_id" not in second
    assert second["command_id"].startswith("batch-")


def test_errors_name_the_line_and_the_field() -> None:
    batch = parse_batch(
        csv_text(
            row(),
            row(PRIORIDADE="25"),
            row(DADOS="x" * 101, DISPOSITIVO=""),
        )
        + b"1,2\n",
        "csv",
    )
    messages = [str(e) for e in batch.errors]
    assert any(m.startswith("line 3: PRIORIDADE:") for m in messages)
    assert any(m.startswith("line 4: DADOS:") for m in messages)
    assert any(m.startswith("line 4: DISPOSITIVO:") for m in messages)
    assert any(m.startswith("line 5: 2 cells") for m in messages)
    assert batch.invalid_rows == 3 and len(batch.commands) == 1


def test_channel_id_and_expires_at_are_checked() -> None:
    header = HEADER + ",channel_id,expires_at"
    batch = parse_batch(csv_text(row() + ",abc,tomorrow", row() + ",0,", header=header), "csv")
    fields = {(e.line, e.field) for e in batch.errors}
    assert fields == {(2, "channel_id"), (2, "expires_at"), (3, "channel_id")}


def test_line_numbers_count_multi_line_cells_and_skip_blank_lines() -> None:
    text = csv_text(row(DADOS="two\nlines"), "", row(ID_CHAMADA="c3", PRIORIDADE="x"))
    batch = parse_batch(text, "csv")
    assert [e.line for e in batch.errors] == [5]
    assert json.loads(batch.commands[0].body)["redirect"]["DADOS"] == "two\nlines"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (HEADER + ",PRIORIDAD", "PRIORIDAD: unknown column"),
        (HEADER.replace("DADOS", "DADOS,DADOS"), "DADOS: column appears 2 times"),
        (HEADER.replace(",DADOS", ""), "DADOS: required column missing"),
        (HEADER + ",issued_at", "issued_at: unknown column"),
    ],
)
def test_a_bad_header_makes_the_whole_file_invalid(header: str, message: str) -> None:
    with pytest.raises(BatchFileError, match=message):
        parse_batch(csv_text(header=header), "csv")


def test_semicolons_a_bom_and_spaces_are_understood() -> None:
    header = HEADER.replace(",", ";")
    line = ";".join(f" {v} " if k != "DADOS" else "a b " for k, v in VENDOR.items())
    batch = parse_batch("\ufeff".encode() + csv_text(line, header=header), "csv")
    assert batch.errors == []
    redirect = json.loads(batch.commands[0].body)["redirect"]
    assert redirect["DISPOSITIVO"] == "1125000" and redirect["DADOS"] == "a b "


def test_non_utf8_is_a_file_error() -> None:
    with pytest.raises(BatchFileError, match="not UTF-8"):
        parse_batch(HEADER.encode() + b"\n\xff\xfe\n", "csv")


# -- JSON Lines ------------------------------------------------------------------------


def test_jsonl_whole_commands() -> None:
    batch = parse_batch(
        jsonl(
            whole(command_id="j-1"),
            whole(redirect={**VENDOR, "ID_CHAMADA": "c2"}, channel_id=17),
            "",
            "[1, 2]",
            "{broken",
            whole(redirect={**VENDOR, "PRIORIDAD": "1"}),
            whole(version=2, extra=1),
        ),
        "jsonl",
    )
    assert batch.commands[0].command_id == "j-1"
    assert json.loads(batch.commands[1].body)["command_id"].startswith("batch-")
    messages = [str(e) for e in batch.errors]
    assert "line 4: a JSON list, not a command object" in messages
    assert any(m.startswith("line 5: not JSON") for m in messages)
    assert any(m.startswith("line 6: redirect.PRIORIDAD:") for m in messages)
    assert any(m.startswith("line 7: version:") for m in messages)
    assert any(m.startswith("line 7: extra:") for m in messages)


def test_jsonl_rejects_duplicate_keys_and_huge_lines() -> None:
    batch = parse_batch(
        b'{"type": "redirect", "type": "redirect"}\n{"x": "' + b"a" * 70_000 + b'"}\n', "jsonl"
    )
    assert [e.line for e in batch.errors] == [1, 2]
    assert "duplicate JSON key" in batch.errors[0].message


@pytest.mark.parametrize(
    ("name", "content", "fmt"),
    [
        ("a.csv", HEADER, "csv"),
        ("a.jsonl", "{}", "jsonl"),
        ("a.ndjson", "{}", "jsonl"),
        ("a.txt", '  {"type": 1}', "jsonl"),
        ("a.txt", HEADER, "csv"),
    ],
)
def test_format_from_suffix_or_content(tmp_path: Path, name: str, content: str, fmt: str) -> None:
    path = tmp_path / name
    path.write_text(content + "\n")
    assert load_batch(path).format == fmt


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(BatchFileError, match="cannot read"):
        load_batch(tmp_path / "missing.csv")


def test_the_file_error_is_one_of_the_package_errors() -> None:
    assert BatchFileError is errors.BatchFileError  # worker.produce.batch re-exports it
    assert issubclass(BatchFileError, errors.PabxWorkerError)


# -- derived ids and duplicates --------------------------------------------------------


def test_derived_ids_come_from_the_fingerprint_fields_only() -> None:
    base = RedirectCommand.model_validate(whole())
    same = RedirectCommand.model_validate(
        whole(
            expires_at="2030-01-01T00:00:00Z",
            redirect={**VENDOR, "SENHA_DISPOSITIVO": "other", "PRIORIDADE": 0},
        )
    )
    other = RedirectCommand.model_validate(whole(redirect={**VENDOR, "DADOS": "changed"}))
    assert derive_command_id(base) == derive_command_id(same) != derive_command_id(other)
    assert derive_command_id(base) == "batch-" + fingerprint(base)[:32]


def test_the_same_file_gives_the_same_ids_in_any_order() -> None:
    rows = [row(ID_CHAMADA=f"call-{i}") for i in range(5)]
    first = parse_batch(csv_text(*rows), "csv")
    shuffled = parse_batch(csv_text(*reversed(rows)), "csv")
    assert {c.command_id for c in first.commands} == {c.command_id for c in shuffled.commands}
    jsonl_ids = {
        c.command_id
        for c in parse_batch(
            jsonl(*(whole(redirect={**VENDOR, "ID_CHAMADA": f"call-{i}"}) for i in range(5))),
            "jsonl",
        ).commands
    }
    assert jsonl_ids == {c.command_id for c in first.commands}


def test_identical_rows_are_merged_into_one_command() -> None:
    batch = parse_batch(csv_text(row(), row(ID_CHAMADA="b"), row(), row(PRIORIDADE="00")), "csv")
    assert len(batch.commands) == 2 and batch.merged_rows == 1
    assert batch.commands[0].merged_lines == [4]
    assert [e.line for e in batch.errors] == [5]  # "00" is not a priority


def test_one_explicit_id_with_two_bodies_is_an_error() -> None:
    batch = parse_batch(
        jsonl(
            whole(command_id="same"),
            whole(command_id="same"),
            whole(command_id="same", redirect={**VENDOR, "DISPOSITIVO_DESTINO": "9"}),
        ),
        "jsonl",
    )
    assert len(batch.commands) == 1 and batch.merged_rows == 1
    assert [(e.line, e.field) for e in batch.errors] == [(3, "command_id")]
    assert "line 1" in batch.errors[0].message


# -- results, progress and exit status -------------------------------------------------


def test_results_csv() -> None:
    out = io.StringIO()
    write_results(
        out,
        [
            CommandResult("a", "accepted", "", 1),
            CommandResult("b", "rejected", "pabx_bad_request", 1),
            CommandResult("c", "not_published"),
        ],
    )
    assert out.getvalue().splitlines() == [
        "command_id,status,error_code,attempts",
        "a,accepted,,1",
        "b,rejected,pabx_bad_request,1",
        "c,not_published,,",
    ]


@pytest.mark.parametrize(
    ("statuses", "waited", "code"),
    [
        (["published", "published"], False, 0),
        (["published", "not_published"], False, 1),
        (["accepted", "accepted"], True, 0),
        (["accepted", "no_outcome"], True, 1),
        (["accepted", "expired"], True, 1),
    ],
)
def test_exit_status(statuses: list[str], waited: bool, code: int) -> None:
    run = BatchRun([CommandResult(str(i), s) for i, s in enumerate(statuses)], waited=waited)
    assert run.exit_code == code


def test_plain_progress_prints_tenths_and_the_end() -> None:
    out = io.StringIO()
    progress = PlainProgress(out)
    progress.start("publishing", 100)
    for done in range(1, 101):
        progress.update(done)
    progress.update(100)
    lines = out.getvalue().splitlines()
    assert lines[0] == "publishing: 0/100" and lines[-1] == "publishing: 100/100"
    assert len(lines) == 11


class FakeProducer:
    """Confirms all but one command; outcomes for all but another."""

    def __init__(self, refused: str, silent: str) -> None:
        self.refused, self.silent = refused, silent
        self.published: list[Outgoing] = []

    def publish_messages(self, messages: Any, *, reply: bool, on_settled: Any) -> PublishReport:
        report = PublishReport()
        for message in messages:
            self.published.append(message)
            ok = message.correlation_id != self.refused
            on_settled(message, ok, None if ok else "nack")
            if ok:
                report.confirmed.append(message)
            else:
                report.failed.append((message, "nack"))
        return report

    def wait_for(self, ids: Any, timeout: float, progress: Any) -> dict[str, Any]:
        found = {
            cid: {"data": {"status": "failed", "error": {"code": "pabx_error"}, "attempts": 3}}
            for cid in ids
            if cid != self.silent
        }
        progress(len(found))
        return found


def test_run_batch_maps_confirms_and_outcomes_to_results() -> None:
    commands = [BatchCommand(f"c{i}", b"{}", i + 2, "fp") for i in range(3)]
    producer = FakeProducer(refused="c1", silent="c2")
    run = run_batch(producer, commands, wait=5, progress=PlainProgress(io.StringIO()))  # type: ignore[arg-type]
    by_id = {r.command_id: r for r in run.results}
    assert by_id["c0"] == CommandResult("c0", "failed", "pabx_error", 3)
    assert by_id["c1"].status == "not_published" and by_id["c2"].status == "no_outcome"
    assert run.exit_code == 1 and run.error == "nack"
    props = producer.published[0].properties
    assert props["message_id"] == props["correlation_id"] == "c0"


# -- the command line, before any broker is needed -------------------------------------

runner = CliRunner()


def test_cli_invalid_rows_exit_2_and_list_each(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(csv_text(row(PRIORIDADE="25"), row(DADOS="x" * 101)))
    result = runner.invoke(app, ["batch", str(path)])
    assert result.exit_code == 2
    assert f"{path}: line 2: PRIORIDADE" in result.stderr
    assert f"{path}: line 3: DADOS" in result.stderr
    assert "2 of 2 rows are invalid; nothing was published" in result.stderr


def test_cli_skip_invalid_with_nothing_valid_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(csv_text(row(PRIORIDADE="25")))
    result = runner.invoke(app, ["batch", str(path), "--skip-invalid"])
    assert result.exit_code == 2 and "no valid command" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["batch", "missing.csv"], "cannot read"),
        (["batch", "header.csv"], "unknown column"),
        (["batch", "good.csv", "--wait", "-1"], "--wait"),
        (["batch", "good.csv", "--results", "no/such/dir/r.csv"], "--results"),
    ],
)
def test_cli_usage_errors_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "header.csv").write_bytes(csv_text(header=HEADER + ",nope"))
    (tmp_path / "good.csv").write_bytes(csv_text(row()))
    monkeypatch.setenv("PABX_WORKER_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2F")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_no_broker_is_exit_1_and_results_say_not_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "good.csv"
    path.write_bytes(csv_text(row()))
    monkeypatch.setenv("PABX_WORKER_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2F")
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["batch", str(path), "--results", str(out)])
    assert result.exit_code == 1 and "PABX_WORKER_AMQP_URL" in result.stderr
    assert out.read_text().splitlines()[1].endswith(",not_published,,")


def test_batch_dataclass_counts() -> None:
    batch = Batch("csv", 3, [BatchCommand("a", b"", 2, "f", [3])], [])
    assert batch.merged_rows == 1 and batch.invalid_rows == 0
