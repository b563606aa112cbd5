"""gradlab inside other training frameworks. Each integration is its own module and imports its
framework only when imported itself: ``gradlab.integrations.lightning`` (``pip install 'gradlab[lightning]'``)."""
