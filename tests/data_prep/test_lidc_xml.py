"""The LIDC reading-XML parser on fixtures written here from the published element
structure (with and without the http://www.nih.gov namespace), and the nodule measures
and reader clustering."""

import io

import numpy as np
import pytest

from data_prep.lidc import nodules, readxml

BODY = """
  <ResponseHeader>
    <Version>1.8.1</Version>
    <StudyInstanceUID>1.2.3.4</StudyInstanceUID>
    <SeriesInstanceUid>1.2.3.4.5</SeriesInstanceUid>
  </ResponseHeader>
  <readingSession>
    <annotationVersion>3.12</annotationVersion>
    <servicingRadiologistID>reader-a</servicingRadiologistID>
    <unblindedReadNodule>
      <noduleID>Nodule 001</noduleID>
      <characteristics>
        <subtlety>5</subtlety><internalStructure>1</internalStructure>
        <calcification>6</calcification><sphericity>3</sphericity><margin>3</margin>
        <lobulation>3</lobulation><spiculation>4</spiculation><texture>5</texture>
        <malignancy>4</malignancy>
      </characteristics>
      <roi>
        <imageZposition>-100.5</imageZposition>
        <imageSOP_UID>1.2.3.4.5.1</imageSOP_UID>
        <inclusion>TRUE</inclusion>
        <edgeMap><xCoord>10</xCoord><yCoord>10</yCoord></edgeMap>
        <edgeMap><xCoord>20</xCoord><yCoord>10</yCoord></edgeMap>
        <edgeMap><xCoord>20</xCoord><yCoord>20</yCoord></edgeMap>
        <edgeMap><xCoord>10</xCoord><yCoord>20</yCoord></edgeMap>
      </roi>
      <roi>
        <imageZposition>-98.0</imageZposition>
        <imageSOP_UID>1.2.3.4.5.2</imageSOP_UID>
        <inclusion>FALSE</inclusion>
        <edgeMap><xCoord>12</xCoord><yCoord>12</yCoord></edgeMap>
        <edgeMap><xCoord>14</xCoord><yCoord>12</yCoord></edgeMap>
        <edgeMap><xCoord>14</xCoord><yCoord>14</yCoord></edgeMap>
      </roi>
    </unblindedReadNodule>
    <unblindedReadNodule>
      <noduleID>IL057_127364</noduleID>
      <roi>
        <imageZposition>-120.0</imageZposition>
        <imageSOP_UID>1.2.3.4.5.3</imageSOP_UID>
        <inclusion>TRUE</inclusion>
        <edgeMap><xCoord>40</xCoord><yCoord>41</yCoord></edgeMap>
      </roi>
    </unblindedReadNodule>
    <nonNodule>
      <nonNoduleID>Non-nodule 001</nonNoduleID>
      <imageZposition>-130.0</imageZposition>
      <imageSOP_UID>1.2.3.4.5.4</imageSOP_UID>
      <locus><xCoord>60</xCoord><yCoord>61</yCoord></locus>
    </nonNodule>
  </readingSession>
  <readingSession>
    <annotationVersion>3.12</annotationVersion>
    <servicingRadiologistID>reader-b</servicingRadiologistID>
    <unblindedReadNodule>
      <noduleID>2</noduleID>
      <characteristics><malignancy>5</malignancy></characteristics>
      <roi>
        <imageZposition>-100.5</imageZposition>
        <imageSOP_UID>1.2.3.4.5.1</imageSOP_UID>
        <inclusion>TRUE</inclusion>
        <edgeMap><xCoord>11</xCoord><yCoord>11</yCoord></edgeMap>
        <edgeMap><xCoord>21</xCoord><yCoord>11</yCoord></edgeMap>
        <edgeMap><xCoord>21</xCoord><yCoord>21</yCoord></edgeMap>
        <edgeMap><xCoord>11</xCoord><yCoord>21</yCoord></edgeMap>
      </roi>
    </unblindedReadNodule>
    <unblindedReadNodule>
      <noduleID>3</noduleID>
      <roi><imageSOP_UID>1.2.3.4.5.9</imageSOP_UID><inclusion>TRUE</inclusion></roi>
    </unblindedReadNodule>
  </readingSession>
"""

NAMESPACED = ('<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage xmlns="http://www.nih.gov" '
              'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" uid="1.3.6">'
              + BODY + "</LidcReadMessage>")
PLAIN = '<?xml version="1.0"?>\n<LidcReadMessage uid="1.3.6">' + BODY + "</LidcReadMessage>"


@pytest.mark.parametrize("text", [NAMESPACED, PLAIN], ids=["namespaced", "plain"])
def test_parse_reads_the_published_structure(text):
    msg = readxml.parse(io.BytesIO(text.encode()))
    assert (msg.series_uid, msg.study_uid, msg.num_readers) == ("1.2.3.4.5", "1.2.3.4", 2)
    kinds = [(a.reader, a.kind, a.status) for a in msg.annotations]
    assert kinds == [(0, "nodule", "parsed"), (0, "small_nodule", "parsed"),
                     (0, "non_nodule", "parsed"), (1, "nodule", "parsed"),
                     (1, "nodule", "excluded")]
    nod = msg.annotations[0]
    assert nod.malignancy == 4 and len(nod.rois) == 2
    assert nod.rois[0].z_mm == -100.5 and nod.rois[0].inclusion and not nod.rois[1].inclusion
    np.testing.assert_array_equal(nod.rois[0].points_xy, [[10, 10], [20, 10], [20, 20], [10, 20]])
    small = msg.annotations[1]
    assert small.malignancy is None and small.rois[0].points_xy.tolist() == [[40, 41]]
    non = msg.annotations[2]
    assert non.rois[0].z_mm == -130.0 and non.rois[0].points_xy.tolist() == [[60, 61]]
    assert msg.annotations[4].reason == "roi_without_z_position"


@pytest.mark.parametrize("text,reason", [
    ("<LidcReadMessage><ResponseHeader>", "xml_parse_error"),
    ("<IdriReadMessage><ResponseHeader/></IdriReadMessage>", "not_a_ct_reading"),
    ("<LidcReadMessage><ResponseHeader/><readingSession/></LidcReadMessage>", "no_series_uid"),
    ("<LidcReadMessage><ResponseHeader><SeriesInstanceUid>1.2</SeriesInstanceUid>"
     "</ResponseHeader></LidcReadMessage>", "no_reading_session"),
])
def test_files_without_a_ct_reading_have_a_reason(text, reason):
    with pytest.raises(readxml.XmlError) as e:
        readxml.parse(io.BytesIO(text.encode()))
    assert e.value.reason == reason


def test_written_xml_reads_back_both_ways(tmp_path):
    sessions = [[{"kind": "nodule", "id": "n1", "malignancy": 3,
                  "rois": [(1.5, "9.1", True, [(1, 1), (3, 1), (3, 3)])]},
                 {"kind": "non_nodule", "id": "x", "z_mm": 2.0, "sop_uid": "9.2", "xy": (5, 6)}],
                [{"kind": "small_nodule", "id": "s", "roi": (4.0, "9.3", (7, 8))}]]
    for ns in (True, False):
        path = tmp_path / f"{ns}.xml"
        readxml.write(str(path), "1.9", "1.8", sessions, namespace=ns)
        assert ("http://www.nih.gov" in path.read_text()) == ns
        msg = readxml.parse(str(path))
        assert [(a.reader, a.kind, a.malignancy) for a in msg.annotations] == [
            (0, "nodule", 3), (0, "non_nodule", None), (1, "small_nodule", None)]


GEOM = nodules.Geometry((-100.0, -100.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5), 2.0)


def _mark(reader, x0, size, z=0.0, malignancy=3):
    pts = np.array([[x0, x0], [x0 + size, x0], [x0 + size, x0 + size], [x0, x0 + size]], float)
    ann = readxml.Annotation(reader, readxml.NODULE, "n", malignancy,
                             [readxml.Roi(z, "", True, pts), readxml.Roi(z + 2, "", True, pts)])
    return nodules.measure(ann, GEOM)


def test_measure_square_outlines():
    m = _mark(0, 10, 20)                        # 20 px = 10 mm square on two slices
    np.testing.assert_allclose(m.centroid_mm, [-100 + 10, -100 + 10, 1.0])
    assert m.diameter_mm == pytest.approx(np.hypot(10, 10))
    assert m.volume_mm3 == pytest.approx(2 * 100 * 2.0)
    assert (m.z_min_mm, m.z_max_mm) == (0.0, 2.0)


def test_cluster_joins_readers_never_one_reader_twice():
    marks = [_mark(0, 10, 20, malignancy=2), _mark(1, 11, 20, malignancy=4),
             _mark(2, 12, 18, malignancy=5),
             _mark(2, 13, 18),                   # reader 2 again: a second nodule
             _mark(3, 150, 10)]                  # far away: its own nodule
    found = nodules.cluster(marks, min_tolerance_mm=3.0, tolerance_factor=0.5)
    sizes = sorted(len(n.marks) for n in found)
    assert sizes == [1, 1, 3]
    big = max(found, key=lambda n: len(n.marks)).summary()
    assert big["n_readers"] == 3 and big["malignancy_median"] == 4.0
    assert big["malignancy_spread"] == 3.0
