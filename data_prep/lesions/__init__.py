"""Mining radiologists' lesion measurements (GSPS and SR) into lesions.csv (mine.py)."""
