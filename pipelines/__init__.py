"""DALI pipeline definitions and ready recipes (installed as ``dali_relabel.pipelines``)."""
