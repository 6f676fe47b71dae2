"""Bridges to other libraries, each imported on its own so its dependency stays optional:
`hymba.integrations.transformers` registers Hymba with transformers' Auto classes."""
