"""The one exception family of fisherfx."""


class FisherError(ValueError):
    """Bad input to a fisherfx function.

    Every message starts with the public function that raised it, names the parameter (or
    option) concerned and says what was expected and what was given.
    """


FisherfxError = FisherError  # alias: the name used in the style guide
