"""A job is acknowledged only once the journal holds it: through `musicbridge serve` over UDP."""

from __future__ import annotations

import shutil

from tests.bridge.osc_helpers import drain, expect


def test_a_job_the_journal_cannot_record_is_refused_not_acknowledged(tmp_path, tiny_model_dir, serve_daemon):
    with serve_daemon(tmp_path, tiny_model_dir) as (d, c):
        c.send("/track/pad/prompt", "warm pad")
        expect(c, "/ok")
        journal = d.session_dir / "jobs-journal.json"
        journal.unlink(missing_ok=True)
        journal.mkdir()  # the journal cannot be replaced: as a full disk or a read-only folder would refuse it
        c.send("/track/pad/generate", 1, "bars")
        seen: list = []
        err = expect(c, "/error", seen=seen)
        assert err[0] == "failed" and "job journal" in err[1] and "not queued" in err[1], err
        assert not any(a == "/job/accepted" for a, _ in seen + drain(c, 0.5))
        c.send("/job/1/status")
        assert expect(c, "/error")[0] == "not_found"  # no job was kept
        shutil.rmtree(journal)
        c.send("/track/pad/generate", 1, "bars")
        accepted = expect(c, "/job/accepted")
        assert accepted[1] == "pad"
        assert expect(c, "/job/done", timeout=120)[0] == accepted[0]
