"""The console line of a training interval (nitp_ds.logs.format_train_line)."""

from nitp_ds.logs import format_train_line

RECORD = {"step": 12, "loss/total": 3.14159, "loss/ntp": 2.5, "loss/nitp": 0.25, "loss/aux": 1.0123, "lr": 3e-4,
          "grad_norm": 0.987, "tokens_per_s": 12345.6}


def test_train_line_shows_step_losses_lr_norm_and_throughput():
    assert format_train_line(RECORD, 100) == ("step     12/100  loss 3.1416  ntp 2.5000  nitp 0.2500  aux 1.012  "
                                              "lr 3.00e-04  gnorm 0.99  12,346 tok/s")


def test_mfu_and_expert_load_are_shown_when_measured():
    line = format_train_line({**RECORD, "mfu": 0.4234, "moe/max_over_mean": 1.5}, 100)
    assert line.endswith("12,346 tok/s  mfu 42.3%  load max/mean 1.50")


def test_a_missing_grad_norm_shows_nan():
    record = {k: v for k, v in RECORD.items() if k != "grad_norm"}
    assert "gnorm nan" in format_train_line(record, 100)
