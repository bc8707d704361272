"""Exporter ``adapter``: the trained PEFT adapter, loadable with ``PeftModel.from_pretrained``."""

from __future__ import annotations

from peftbench.api import ExporterPlugin, ExportResult
from peftbench.api import hookimpl
from peftbench.files import dir_size


class AdapterExporter(ExporterPlugin):
    """The runner always saves the adapter (exporters need it); this records where and how big."""

    name = "adapter"

    def export(self, options, ctx) -> ExportResult:
        return ExportResult(files={"adapter": str(ctx.adapter_dir)}, sizes={"adapter": dir_size(ctx.adapter_dir)})


@hookimpl
def peftbench_register_exporters(register):
    register(AdapterExporter)
