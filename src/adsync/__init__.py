"""adsync: keeps an agency's database in step with the ad platforms its clients use."""

__version__ = "0.1.0"
