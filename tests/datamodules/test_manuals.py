"""The manual readers keep the prose a person reads and drop markup, navigation and other projects' pages."""

import gzip

import pytest

from datamodules.errors import MissingSourceError
from datamodules.manuals import HtmlText, ManPages, PodText, clean_asciidoc, clean_pod, clean_roff, html_to_text
from datamodules.sources import SourceStats

PAGE = """<html><head><title>T</title><style>p {color: red}</style><script>var x = 1;</script></head><body>
<div class="navheader"><a href="prev.html">Prev</a> Up Next</div>
<div class="body"><h1>Parallel Plans</h1>
<p>Each   worker executes the <b>parallel</b> portion
of the plan &amp; stops.</p><svg><text>diagram</text></svg>
<pre>SELECT *
  FROM t;</pre><ul><li>one</li><li>two</li></ul></div>
<div class="navfooter">Home</div></body></html>"""


def test_html_keeps_headings_paragraphs_lists_and_code_and_drops_navigation():
    text = html_to_text(PAGE, skip=r"(^|\s)nav\w*(\s|$)")
    assert text == "Parallel Plans\n\nEach worker executes the parallel portion of the plan & stops.\n\nSELECT *\n  FROM t;\n\none\n\ntwo"
    assert html_to_text(PAGE, content=r"^body$").startswith("Parallel Plans")


def test_pod_formatting_codes_and_commands():
    pod = ("=head1 NAME\n\nperlre - Perl regular expressions\n\n=over 4\n\n=item B<-w>\n\nWarns about C<< $x <=> $y >> "
           "and L<perlop|perlop/Equality>; see L<perlfunc>. E<lt>tagE<gt>\n\n=back\n\n=begin html\n\n<b>x</b>\n\n"
           "=end html\n\n=cut\n")
    assert clean_pod(pod) == ("NAME\n\nperlre - Perl regular expressions\n\n-w\n\nWarns about $x <=> $y and perlop; "
                              "see perlfunc. <tag>")


def test_roff_fills_paragraphs_and_keeps_highlighted_words():
    roff = ('.\\" comment\n.TH open 2 2023-02-05 "Linux man-pages 6.03"\n.SH NAME\nopen \\- open a file\n.SH DESCRIPTION\n'
            "The\n.B open ()\nsystem call opens the file specified by\n.IR pathname .\nSee\n.BR close (2)\n"
            "for more.\n.PP\n.nf\nint fd;\nfd = 0;\n.fi\n")
    assert clean_roff(roff) == ("NAME\nopen - open a file\n\nDESCRIPTION\nThe open () system call opens the file "
                                "specified by pathname. See close(2) for more.\n\nint fd;\nfd = 0;")


def test_man_pages_of_other_projects_and_redirects_are_skipped(tmp_path):
    (tmp_path / "man2").mkdir()
    pages = {"open.2.gz": '.TH open 2 2023 "Linux man-pages 6.03"\n.SH NAME\nopen \\- open a file\n',
             "creat.2.gz": ".so man2/open.2\n", "curl.2.gz": '.TH curl 2 2023 "curl 7.88"\n.SH NAME\ncurl\n'}
    for name, text in pages.items():
        (tmp_path / "man2" / name).write_bytes(gzip.compress(text.encode()))
    stats = SourceStats()
    docs = list(ManPages(["man2/*.2.gz"], root=str(tmp_path)).read(stats))
    assert [d.path for d in docs] == ["man2/open.2.gz"] and stats.skipped == {"generated": 2}


def test_asciidoc_drops_markup_and_rewrites_links():
    adoc = "git-log(1)\n==========\n\n[[opts]]\nOPTIONS\n-------\nSee linkgit:git-diff[1] and link:howto.html[the howto].\n----\n$ git log\n----\n"
    assert clean_asciidoc(adoc) == "git-log(1)\n\nOPTIONS\nSee git-diff(1) and the howto.\n$ git log"


def test_missing_manual_names_its_package(tmp_path):
    with pytest.raises(MissingSourceError, match="apt-get install perl-doc"):
        PodText(["*.pod"], root=str(tmp_path / "nowhere"), package="perl-doc").files()
    (tmp_path / "a.html").write_text(PAGE)
    (tmp_path / "genindex.html").write_text(PAGE)
    assert [p.name for p in HtmlText(["*.html"], root=str(tmp_path), exclude=["genindex*"]).files()] == ["a.html"]
