"""MAESTRO + Music Transformer benchmark setting (paper, Table 3 and Appendix C).

* :mod:`~dattri.benchmark.datasets.maestro.events`: the 388-event performance
  vocabulary (NOTE_ON 128, NOTE_OFF 128, TIME_SHIFT 100 x 10 ms, VELOCITY 32)
  of Oore et al. 2018, MIDI <-> events.
* :func:`create_maestro_datasets`: fixed-length event windows from MAESTRO
  (``path=``) or, offline, from the music21 Bach chorales (a stand-in).
* :func:`create_musictransformer_model`: Music Transformer with relative
  attention (Huang et al. 2019); :func:`train_maestro_musictransformer`,
  :func:`loss_maestro_musictransformer` and
  :func:`target_maestro_musictransformer`.

Data licences: MAESTRO CC BY-NC-SA 4.0; the music21 corpus per its
``corpus/license.txt``.
"""

from dattri.benchmark.datasets.maestro.data import (
    EventDataset,
    create_maestro_datasets,
    default_cache_dir,
)
from dattri.benchmark.datasets.maestro.events import (
    VOCAB_SIZE,
    Note,
    event_name,
    events_to_midi,
    events_to_notes,
    midi_to_events,
    midi_to_notes,
    notes_to_events,
)
from dattri.benchmark.datasets.maestro.maestro_musictransformer import (
    loss_maestro_musictransformer,
    target_maestro_musictransformer,
    train_maestro_musictransformer,
)
from dattri.benchmark.datasets.maestro.model import (
    MusicTransformer,
    create_musictransformer_model,
    musictransformer_from_state_dict,
    musictransformer_num_params,
)

__all__ = [
    "VOCAB_SIZE",
    "EventDataset",
    "MusicTransformer",
    "Note",
    "create_maestro_datasets",
    "create_musictransformer_model",
    "default_cache_dir",
    "event_name",
    "events_to_midi",
    "events_to_notes",
    "loss_maestro_musictransformer",
    "midi_to_events",
    "midi_to_notes",
    "musictransformer_from_state_dict",
    "musictransformer_num_params",
    "notes_to_events",
    "target_maestro_musictransformer",
    "train_maestro_musictransformer",
]
