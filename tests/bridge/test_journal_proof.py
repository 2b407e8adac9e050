"""The job journal records whether a job's reply address had proved itself (bridge.osc.reply_budget),
so a restart can still report the jobs a crash interrupted to it; journals written before the
field existed load as unproven."""

from __future__ import annotations

import json

from bridge.state.journal import FILE_NAME, Entry, Journal


def test_a_proof_is_kept_across_a_restart_and_an_older_journal_loads_unproven(tmp_path):
    j = Journal(tmp_path)
    j.add(Entry(1, "/track/a/generate", (2.0, 0), ("127.0.0.1", 9011), ("127.0.0.1", 9011), True))
    j.add(Entry(2, "/track/a/generate", (2.0, 0), ("10.0.0.5", 9011), ("10.0.0.5", 9011)))
    raw = json.loads((tmp_path / FILE_NAME).read_text())
    assert [e["proven"] for e in raw["jobs"]] == [True, False]
    assert [(e.job_id, e.proven) for e in Journal(tmp_path).load_interrupted()] == [(1, True), (2, False)]

    del raw["jobs"][0]["proven"]  # as a journal from before this field
    raw["jobs"][1]["proven"] = "yes"  # not a bool: the entry is not trusted
    (tmp_path / FILE_NAME).write_text(json.dumps(raw))
    assert [(e.job_id, e.proven) for e in Journal(tmp_path).load_interrupted()] == [(1, False)]
