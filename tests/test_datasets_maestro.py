"""Tests of the MAESTRO / Music Transformer setting: event codec, MIDI reading,
datasets and cache, the model (relative attention, causality), loss functions
and per-example gradients under torch.func."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch.func import grad, vmap
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dattri.benchmark.datasets.maestro import (
    VOCAB_SIZE,
    Note,
    create_maestro_datasets,
    create_musictransformer_model,
    event_name,
    events_to_midi,
    events_to_notes,
    loss_maestro_musictransformer,
    midi_to_events,
    midi_to_notes,
    musictransformer_from_state_dict,
    musictransformer_num_params,
    notes_to_events,
    target_maestro_musictransformer,
    train_maestro_musictransformer,
)
from dattri.benchmark.datasets.maestro import data as maestro_data
from dattri.benchmark.datasets.maestro.events import transpose_events
from dattri.benchmark.datasets.maestro.model import relative_skew
from dattri.errors import CheckpointError, DattriValueError

_HAS_PRETTY_MIDI = importlib.util.find_spec("pretty_midi") is not None
_HAS_MUSIC21 = importlib.util.find_spec("music21") is not None
needs_pretty_midi = pytest.mark.skipif(
    not _HAS_PRETTY_MIDI, reason="MIDI files need `pip install pretty_midi`",
)
needs_music21 = pytest.mark.skipif(
    not (_HAS_MUSIC21 and _HAS_PRETTY_MIDI),
    reason="the offline stand-in needs `pip install music21==10.5.1 pretty_midi`",
)


def _names(tokens):
    return [event_name(t) for t in tokens]


def _tiny(**kw):
    sizes = {"n_layers": 2, "n_heads": 2, "d_model": 8, "d_ff": 16, "max_len": 12, "dropout": 0.0}
    sizes.update(kw)
    return create_musictransformer_model(**sizes)


# ----------------------------------------------------------------- event codec
def test_vocabulary_layout():
    assert VOCAB_SIZE == 128 + 128 + 100 + 32
    assert _names([0, 127, 128, 255, 256, 355, 356, 387]) == [
        "NOTE_ON_0", "NOTE_ON_127", "NOTE_OFF_0", "NOTE_OFF_127",
        "TIME_SHIFT_1", "TIME_SHIFT_100", "VELOCITY_0", "VELOCITY_31",
    ]
    with pytest.raises(DattriValueError, match="outside 0..387"):
        event_name(388)


def test_encode_hand_computed_example():
    notes = [
        Note(0.0, 0.5, 60, 80), Note(0.25, 1.75, 64, 100), Note(0.5, 1.0, 60, 80),
    ]
    assert _names(notes_to_events(notes)) == [
        "VELOCITY_20", "NOTE_ON_60", "TIME_SHIFT_25",
        "VELOCITY_25", "NOTE_ON_64", "TIME_SHIFT_25",
        "NOTE_OFF_60", "VELOCITY_20", "NOTE_ON_60", "TIME_SHIFT_50",
        "NOTE_OFF_60", "TIME_SHIFT_75", "NOTE_OFF_64",
    ]


def test_long_gaps_split_into_100_step_shifts():
    tokens = notes_to_events([Note(2.5, 2.53, 30, 10)])
    assert _names(tokens) == [
        "TIME_SHIFT_100", "TIME_SHIFT_100", "TIME_SHIFT_50", "VELOCITY_2",
        "NOTE_ON_30", "TIME_SHIFT_3", "NOTE_OFF_30",
    ]


def _random_quantised_notes(rng, n_pitches=6, per_pitch=5):
    notes = []
    for pitch in rng.choice(128, size=n_pitches, replace=False):
        t = int(rng.integers(0, 300))
        for _ in range(per_pitch):
            on = t + int(rng.integers(0, 250))
            off = on + int(rng.integers(1, 260))
            notes.append(Note(on / 100, off / 100, int(pitch), 4 * int(rng.integers(0, 32)) + 2))
            t = off
    return notes


def _steps(notes):
    return sorted((round(n.start * 100), round(n.end * 100), n.pitch, n.velocity) for n in notes)


def test_round_trip_on_quantised_notes():
    rng = np.random.default_rng(0)
    for _ in range(25):
        notes = _random_quantised_notes(rng)
        tokens = notes_to_events(notes)
        assert tokens.min() >= 0 and tokens.max() < VOCAB_SIZE
        assert _steps(events_to_notes(tokens)) == _steps(notes)


def test_reencoding_decoded_events_is_identity_for_any_notes():
    rng = np.random.default_rng(1)
    notes = [
        Note(float(s), float(s + d), int(p), int(v))
        for s, d, p, v in zip(
            rng.uniform(0, 5, 80), rng.uniform(0.001, 1.5, 80),
            rng.integers(40, 50, 80), rng.integers(0, 128, 80),
        )
    ]  # unquantised, overlapping same-pitch notes included
    tokens = notes_to_events(notes)
    np.testing.assert_array_equal(notes_to_events(events_to_notes(tokens)), tokens)


def test_same_pitch_overlaps_are_normalised():
    restruck = events_to_notes(notes_to_events([Note(0, 1, 60, 66), Note(0.5, 1.5, 60, 66)]))
    assert _steps(restruck) == [(0, 50, 60, 66), (50, 150, 60, 66)]
    merged = events_to_notes(notes_to_events([Note(0, 1, 60, 66), Note(0, 0.3, 60, 66)]))
    assert _steps(merged) == [(0, 100, 60, 66)]
    zero_length = events_to_notes(notes_to_events([Note(0.2, 0.2, 61, 66)]))
    assert _steps(zero_length) == [(20, 21, 61, 66)]


def test_decoder_tolerates_stray_events():
    tokens = [128 + 60, 60, 256 + 9, 60, 256 + 4]  # off of silent pitch, re-strike, open end
    assert _steps(events_to_notes(tokens)) == [(0, 10, 60, 66), (10, 15, 60, 66)]
    with pytest.raises(DattriValueError, match="tokens"):
        events_to_notes([0, 400])
    with pytest.raises(DattriValueError, match="pitch 130"):
        notes_to_events([Note(0, 1, 130, 64)])


def test_transpose_events():
    tokens = notes_to_events([Note(0, 0.5, 60, 80), Note(0.1, 0.2, 125, 80)])
    up = transpose_events(tokens, 2)
    assert _steps(events_to_notes(up)) == [(0, 50, 62, 82), (10, 20, 127, 82)]
    assert transpose_events(tokens, 3) is None
    np.testing.assert_array_equal(transpose_events(tokens, 0), tokens)


# ------------------------------------------------------------------ MIDI files
def _write_midi(path, instruments):
    import pretty_midi

    pm = pretty_midi.PrettyMIDI()
    for program, is_drum, notes, ccs in instruments:
        inst = pretty_midi.Instrument(program=program, is_drum=is_drum)
        inst.notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=e) for s, e, p, v in notes]
        inst.control_changes = [pretty_midi.ControlChange(64, val, t) for t, val in ccs]
        pm.instruments.append(inst)
    pm.write(str(path))
    return path


@needs_pretty_midi
def test_midi_fixture_reads_back_to_exact_events(tmp_path):
    file = _write_midi(tmp_path / "a.mid", [
        (0, False, [(0.0, 0.5, 60, 82), (0.5, 1.0, 64, 82)], []),
        (40, False, [(0.25, 0.75, 48, 30)], []),
        (0, True, [(0.0, 0.1, 36, 100)], []),  # drums are ignored
    ])
    assert _names(midi_to_events(file)) == [
        "VELOCITY_20", "NOTE_ON_60", "TIME_SHIFT_25",
        "VELOCITY_7", "NOTE_ON_48", "TIME_SHIFT_25",
        "NOTE_OFF_60", "VELOCITY_20", "NOTE_ON_64", "TIME_SHIFT_25",
        "NOTE_OFF_48", "TIME_SHIFT_25", "NOTE_OFF_64",
    ]
    raw = file.read_bytes()
    np.testing.assert_array_equal(midi_to_events(raw), midi_to_events(str(file)))
    pm = events_to_midi(midi_to_events(file))
    assert _steps(midi_to_notes(pm)) == _steps(events_to_notes(midi_to_events(file)))


@needs_pretty_midi
def test_sustain_pedal_extends_released_notes(tmp_path):
    file = _write_midi(tmp_path / "p.mid", [
        (0, False, [(0.0, 0.5, 60, 66), (1.5, 2.0, 62, 66)], [(0.25, 127), (1.25, 0)]),
    ])
    assert _steps(midi_to_notes(file, sustain=True)) == [(0, 125, 60, 66), (150, 200, 62, 66)]
    assert _steps(midi_to_notes(file, sustain=False)) == [(0, 50, 60, 66), (150, 200, 62, 66)]


@needs_pretty_midi
def test_unreadable_midi_raises(tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"not midi at all")
    with pytest.raises(DattriValueError, match="cannot read"):
        midi_to_events(bad)


# -------------------------------------------------------------------- datasets
def _maestro_folder(tmp_path, n_pieces=5):
    root = tmp_path / "maestro-v2.0.0"
    (root / "2004").mkdir(parents=True)
    rng = np.random.default_rng(3)
    rows, splits = [], ["train", "train", "validation", "test", "train"]
    for i in range(n_pieces):
        notes = [
            (s / 100, (s + d) / 100, int(p), 66)
            for s, d, p in zip(np.sort(rng.integers(0, 400, 12)) , rng.integers(5, 60, 12), rng.integers(50, 70, 12))
        ]
        _write_midi(root / "2004" / f"p{i}.midi", [(0, False, notes, [])])
        rows.append(f"X,Piece {i},{splits[i]},2004,2004/p{i}.midi,2004/p{i}.wav,4.0")
    header = "canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"
    (root / "maestro-v2.0.0.csv").write_text("\n".join([header, *rows]) + "\n")
    return tmp_path, root, splits


def _expected_windows(files, seq_len, stride):
    rows = []
    for f in files:
        s = midi_to_events(f)
        rows += [s[a : a + seq_len + 1] for a in range(0, len(s) - seq_len, stride)]
    return np.stack(rows)


@needs_pretty_midi
def test_maestro_folder_windows_and_splits(tmp_path):
    parent, root, splits = _maestro_folder(tmp_path)
    kw = {"seq_len": 8, "stride": 5, "n_train": None, "n_test": None, "cache_dir": tmp_path / "c"}
    train, test = create_maestro_datasets(parent, one_test_window_per_piece=False, **kw)
    _, prompts = create_maestro_datasets(parent, **kw)  # default: one prompt per test piece
    files = sorted((root / "2004").glob("*.midi"))
    want_train = _expected_windows([f for f, s in zip(files, splits) if s == "train"], 8, 5)
    want_test = _expected_windows([f for f, s in zip(files, splits) if s == "test"], 8, 5)
    got_train = torch.cat([train.tensors[0], train.tensors[1][:, -1:]], 1).numpy()
    np.testing.assert_array_equal(got_train, want_train)
    np.testing.assert_array_equal(test.tensors[0].numpy(), want_test[:, :-1])
    np.testing.assert_array_equal(test.tensors[1].numpy(), want_test[:, 1:])
    np.testing.assert_array_equal(prompts.tensors[0].numpy(), want_test[:1, :-1])
    test_names = {os.path.basename(test.pieces[i]) for i in test.piece.tolist()}
    train_names = {os.path.basename(train.pieces[i]) for i in train.piece.tolist()}
    assert test_names == {"p3.midi"} and train_names == {"p0.midi", "p1.midi", "p4.midi"}
    assert "CC BY-NC-SA" in train.licence and train.transposition.eq(0).all()
    x, y = train[0]
    assert x.dtype == torch.int64 and x.shape == (8,) and torch.equal(x[1:], y[:-1])


@needs_pretty_midi
def test_cache_is_reused_and_written_atomically(tmp_path, monkeypatch):
    parent, _, _ = _maestro_folder(tmp_path)
    kw = {"seq_len": 6, "n_train": None, "n_test": None, "cache_dir": tmp_path / "c"}
    first = create_maestro_datasets(parent, **kw)
    cached = list((tmp_path / "c" / "maestro").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"  # no temporary file left

    def boom(*a, **k):
        raise AssertionError("MIDI parsed again despite the cache")

    monkeypatch.setattr(maestro_data, "midi_to_events", boom)
    again = create_maestro_datasets(parent, **kw)
    assert torch.equal(first[0].tensors[0], again[0].tensors[0])
    monkeypatch.undo()
    cached[0].write_bytes(b"corrupt")  # an unreadable cache is rebuilt
    rebuilt = create_maestro_datasets(parent, **kw)
    assert torch.equal(first[1].tensors[1], rebuilt[1].tensors[1])


@needs_pretty_midi
def test_sampling_sizes_and_plain_folder_split(tmp_path):
    parent, root, _ = _maestro_folder(tmp_path)
    (root / "maestro-v2.0.0.csv").unlink()  # no metadata: every tenth piece is a test piece
    full, _ = create_maestro_datasets(root, seq_len=6, stride=2, n_train=None, n_test=None, cache_dir=False)
    sub, _ = create_maestro_datasets(root, seq_len=6, stride=2, n_train=7, n_test=None, cache_dir=False, seed=5)
    assert len(sub) == 7
    rows = {tuple(r) for r in full.tensors[0].tolist()}
    assert all(tuple(r) in rows for r in sub.tensors[0].tolist())
    same, _ = create_maestro_datasets(root, seq_len=6, stride=2, n_train=7, n_test=None, cache_dir=False, seed=5)
    assert torch.equal(sub.tensors[0], same.tensors[0])
    with pytest.warns(UserWarning, match="only"):
        create_maestro_datasets(root, seq_len=6, n_train=10**6, n_test=None, cache_dir=False)


def test_dataset_argument_errors(tmp_path):
    with pytest.raises(DattriValueError, match="seq_len"):
        create_maestro_datasets(tmp_path, seq_len=0)
    with pytest.raises(DattriValueError, match="transpose"):
        create_maestro_datasets(tmp_path, transpose=[])
    with pytest.raises(DattriValueError, match="not both"):
        create_maestro_datasets(tmp_path, dataset_path=tmp_path)
    with pytest.raises(DattriValueError, match="not a folder"):
        create_maestro_datasets(tmp_path / "missing")


@needs_pretty_midi
def test_generated_music_needs_files(tmp_path):
    parent, _, _ = _maestro_folder(tmp_path)
    with pytest.raises(DattriValueError, match="generated_music"):
        create_maestro_datasets(parent, generated_music=True, cache_dir=False)


@needs_music21
def test_offline_chorales_stand_in(tmp_path):
    with pytest.warns(UserWarning, match="OFFLINE STAND-IN"):
        train, test = create_maestro_datasets(
            max_pieces=1, seq_len=64, n_train=None, n_test=None, cache_dir=tmp_path,
        )
    assert len(train) > 0 and len(test) == 12  # one prompt of one test piece in 12 keys
    assert set(train.transposition.tolist()) == set(range(-5, 7))
    assert sorted(test.transposition.tolist()) == list(range(-5, 7))
    assert train.pieces[int(train.piece[0])].startswith("bach/")
    assert test.pieces[int(test.piece[0])] != train.pieces[int(train.piece[0])]
    x = torch.cat([train.tensors[0], test.tensors[0]])
    assert x.min() >= 0 and x.max() < VOCAB_SIZE
    assert "music21" in train.licence and "stand-in" in train.source


@pytest.mark.slow
@needs_music21
def test_offline_paper_sizes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, test = create_maestro_datasets()
    assert (len(train), len(test)) == (5000, 178)
    assert train.tensors[0].shape == (5000, 256)
    assert not set(train.piece.tolist()) & set(test.piece.tolist())


# ----------------------------------------------------------------------- model
def test_relative_skew_matches_definition():
    rel = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = relative_skew(rel)
    for i in range(5):
        for j in range(i + 1):
            assert torch.equal(out[..., i, j], rel[..., i, j - i + 4])


def test_relative_attention_matches_dense_reference():
    torch.manual_seed(0)
    model = _tiny().double().eval()
    attn = model.layers[0].attn
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    er = attn.rel_emb  # row m <-> distance m - (max_len - 1)
    out = torch.zeros(2, 7, 8, dtype=torch.float64)
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        for i in range(7):
            logits = torch.stack([
                (q[:, i, sl] * (k[:, j, sl] + er[j - i + attn.max_len - 1])).sum(-1)
                for j in range(i + 1)
            ], -1) / math.sqrt(4)
            out[:, i, sl] = (logits.softmax(-1).unsqueeze(-1) * v[:, : i + 1, sl]).sum(1)
    torch.testing.assert_close(attn(x), attn.out(out))


def test_output_shape_and_causality():
    torch.manual_seed(0)
    model = _tiny().double().eval()
    x = torch.randint(0, VOCAB_SIZE, (3, 10))
    logits = model(x)
    assert logits.shape == (3, 10, VOCAB_SIZE) and logits.dtype == torch.float64
    for j in (0, 4, 9):
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 1) % VOCAB_SIZE
        changed = model(x2)
        torch.testing.assert_close(changed[:, :j], logits[:, :j], rtol=0, atol=0)
        assert not torch.allclose(changed[:, j], logits[:, j])
    with pytest.raises(DattriValueError, match="max_len"):
        model(torch.zeros(1, 13, dtype=torch.int64))


def test_parameter_count_of_paper_size():
    model = create_musictransformer_model()
    n = sum(p.numel() for p in model.parameters())
    assert n == musictransformer_num_params()
    assert abs(n - 13.3e6) / 13.3e6 < 0.02  # Table 3: 13.3M
    x, y = _batch(n=1, length=5)
    params = dict(model.eval().named_parameters())  # default model= is the paper size
    torch.testing.assert_close(
        loss_maestro_musictransformer(params, (x, y)),
        loss_maestro_musictransformer(params, (x, y), model=model),
    )
    tiny = _tiny()
    assert sum(p.numel() for p in tiny.parameters()) == musictransformer_num_params(
        n_layers=2, n_heads=2, d_model=8, d_ff=16, max_len=12,
    )


def test_model_argument_errors():
    with pytest.raises(DattriValueError, match="divisible"):
        create_musictransformer_model(d_model=10, n_heads=3)
    with pytest.raises(DattriValueError, match="n_layers"):
        create_musictransformer_model(n_layers=0)
    with pytest.raises(DattriValueError, match="dropout"):
        create_musictransformer_model(dropout=1.0)


# ---------------------------------------------------------- losses, gradients
def _batch(n=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (n, length), generator=g), torch.randint(
        0, VOCAB_SIZE, (n, length), generator=g,
    )


def test_losses_match_dense_cross_entropy():
    torch.manual_seed(1)
    model = _tiny().double().eval()
    params = dict(model.named_parameters())
    x, y = _batch()
    logp = torch.log_softmax(model(x), -1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (B, L)
    loss = loss_maestro_musictransformer(params, (x, y), model=model)
    torch.testing.assert_close(loss, nll.mean())
    target = target_maestro_musictransformer(params, [x, y], model=model)
    torch.testing.assert_close(target, nll[:, -1].mean())
    as_dict = loss_maestro_musictransformer(params, {"x": x, "y": y}, model=model)
    torch.testing.assert_close(as_dict, loss)


def test_per_example_gradients_under_vmap_match_single_example():
    torch.manual_seed(2)
    model = _tiny().double().eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    loss = functools.partial(loss_maestro_musictransformer, model=model)
    x, y = _batch()

    def one(p, xi, yi):
        return loss(p, (xi.unsqueeze(0), yi.unsqueeze(0)))

    per_example = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        single = grad(loss)(params, (x[i : i + 1], y[i : i + 1]))
        for name in params:
            torch.testing.assert_close(per_example[name][i], single[name], rtol=1e-10, atol=1e-12)


def test_training_lowers_the_loss():
    torch.manual_seed(3)
    x, y = _batch(n=4, length=12, seed=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    model = _tiny()
    before = loss_maestro_musictransformer(dict(model.named_parameters()), (x, y), model=model.eval())
    trained = train_maestro_musictransformer(loader, seed=0, epoch_num=15, model=model, lr=3e-3, progress=False)
    assert trained is model and not trained.training
    after = loss_maestro_musictransformer(dict(trained.named_parameters()), (x, y), model=trained)
    assert after < before - 0.5


def test_checkpoint_form_gives_per_example_losses(tmp_path):
    torch.manual_seed(4)
    model = _tiny().double().eval()
    x, y = _batch(n=5)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    path = tmp_path / "mt.pt"
    torch.save(model.state_dict(), path)
    per = loss_maestro_musictransformer(str(path), loader)  # sizes read off the checkpoint
    params = dict(model.named_parameters())
    want = torch.stack([
        loss_maestro_musictransformer(params, (x[i : i + 1], y[i : i + 1]), model=model) for i in range(5)
    ])
    torch.testing.assert_close(per.double(), want.detach(), rtol=1e-5, atol=1e-6)
    last = target_maestro_musictransformer(model.state_dict(), loader, model=model)
    nll = F.cross_entropy(model(x)[:, -1], y[:, -1], reduction="none")
    torch.testing.assert_close(last.double(), nll.detach(), rtol=1e-5, atol=1e-6)
    rebuilt = musictransformer_from_state_dict(model.state_dict())
    assert len(rebuilt.layers) == 2 and rebuilt.layers[0].attn.n_heads == 2
    with pytest.raises(CheckpointError, match="MusicTransformer"):
        musictransformer_from_state_dict({"w": torch.zeros(1)})


def test_loss_errors():
    tiny = _tiny()
    x, y = _batch()
    with pytest.raises(DattriValueError, match="pass model="):
        loss_maestro_musictransformer(dict(tiny.named_parameters()), (x, y))
    with pytest.raises(DattriValueError, match="batch"):
        loss_maestro_musictransformer(dict(tiny.named_parameters()), (x, y, x), model=tiny)
    with pytest.raises(DattriValueError, match="epoch_num"):
        train_maestro_musictransformer([(x, y)], epoch_num=-1, model=tiny)


def test_published_positional_order_for_training():
    tiny = _tiny()
    before = {k: p.detach().clone() for k, p in tiny.named_parameters()}
    x, y = _batch(n=2)
    out = train_maestro_musictransformer([(x, y)], 0, 2, "cpu", model=tiny, progress=False)
    assert out is tiny  # (loader, seed, num_epoch, device) trained on the CPU
    assert any(not torch.equal(before[k], p) for k, p in tiny.named_parameters())
