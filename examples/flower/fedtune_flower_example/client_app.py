"""The ClientApp: each node trains fedtune's client recipe on its partition of the data."""

from fedtune.flower import client_app

app = client_app()
