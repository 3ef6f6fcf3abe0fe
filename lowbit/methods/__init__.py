"""Format methods: one object per GPU format (``base.FormatMethod``), looked up in ``registry``."""
