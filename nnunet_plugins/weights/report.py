"""What the weight transfers report share: a dataclass written as JSON beside the run or file it describes."""
import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class WeightsReport:
    """Base of the reports of UpKern and of :func:`~nnunet_plugins.weights.transfer.transfer_weights`."""

    def save(self, path: Path | str) -> None:
        """Write the report's fields to ``path`` as indented JSON."""
        Path(path).write_text(json.dumps(asdict(self), indent=2) + '\n')
