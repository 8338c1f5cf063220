"""Comments: publish, reply, getinfo paging, update, delete with sub-comments."""
import asyncio

from conftest import expect, table_counts


async def test_root_comments_of_one_post_oldest_first(api):
    post_id, other_post = await api.publish(), await api.publish()
    first = await api.comment(post_id, "u1", "one")
    await asyncio.sleep(0.01)
    second = await api.comment(post_id, "u2", "two")
    await api.comment(other_post, "u3", "elsewhere")  # the Go version mixed these in; we do not
    data = await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0,
                                                     "cursor": "1949-10-01T00:00:00"})
    comments = data["comments"]
    assert [c["id"] for c in comments] == [first, second]
    c = comments[0]
    assert set(c) == {"id", "user_id", "content", "root_id", "father_id", "target_user_id", "post_id", "time", "svc",
                      "child_num", "extra", "like_count"}  # like_count: always on this page
    assert (c["user_id"], c["content"], c["root_id"], c["father_id"], c["target_user_id"], c["post_id"],
            c["svc"], c["child_num"], c["extra"]) == ("u1", "one", 0, 0, None, post_id, api.svc, 0, None)


async def test_paging_with_cursor_and_next_cursor(api):
    post_id = await api.publish()
    ids = [await api.comment(post_id, content=f"c{i}") for i in range(5)]
    page1 = await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0, "limit": 2})
    assert [c["id"] for c in page1["comments"]] == ids[:2]
    page2 = await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0, "limit": 2,
                                                      "cursor": page1["next_cursor"]})
    assert [c["id"] for c in page2["comments"]] == ids[2:4]
    page3 = await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0, "limit": 2,
                                                      "cursor": page2["next_cursor"]})
    assert [c["id"] for c in page3["comments"]] == ids[4:]
    empty = await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0,
                                                      "cursor": page3["next_cursor"]})
    assert empty == {"comments": [], "next_cursor": None}  # every page has next_cursor; null when empty
    short = await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0, "limit": 2,
                                                      "cursor": page2["next_cursor"]})
    assert short["next_cursor"] == page3["next_cursor"]  # a short page still says where to continue
    newer = await api.comment(post_id, content="after the last page")
    later = await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0,
                                                      "cursor": page3["next_cursor"]})
    assert [c["id"] for c in later["comments"]] == [newer]


async def test_reply_thread_and_child_num(api):
    post_id = await api.publish()
    root = await api.comment(post_id, "u1")
    r1 = await api.reply(post_id, root, root, "u2", "to root")
    r2 = await api.reply(post_id, root, r1, "u3", "to r1")
    roots = (await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0}))["comments"]
    assert [(c["id"], c["child_num"]) for c in roots] == [(root, 2)]
    replies = (await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": root}))["comments"]
    assert [(c["id"], c["root_id"], c["father_id"], c["target_user_id"], c["child_num"]) for c in replies] == [
        (r1, root, root, "u1", None), (r2, root, r1, "u2", None)]


async def test_reply_errors(api, db):
    post_id, other = await api.publish(), await api.publish()
    root = await api.comment(post_id)
    other_root = await api.comment(post_id)
    before = await table_counts(db, api.svc)
    base = {"post_id": post_id, "user_id": "u9"}
    wrong = "something of params is wrong"
    expect(await api.call("POST", "/comments/reply", {**base, "root_comment_id": 0, "father_comment_id": root},
                          data={"content": "x"}), 400, wrong)
    expect(await api.call("POST", "/comments/reply", {**base, "root_comment_id": root, "father_comment_id": 0},
                          data={"content": "x"}), 400, wrong)
    expect(await api.call("POST", "/comments/reply", {**base, "root_comment_id": root, "father_comment_id": 424242},
                          data={"content": "x"}), 10006)
    expect(await api.call("POST", "/comments/reply", {**base, "root_comment_id": other_root,
                                                      "father_comment_id": root}, data={"content": "x"}), 400, wrong)
    expect(await api.call("POST", "/comments/reply", {**base, "post_id": other, "root_comment_id": root,
                                                      "father_comment_id": root}, data={"content": "x"}), 400, wrong)
    expect(await api.call("POST", "/comments/reply", {**base, "root_comment_id": root, "father_comment_id": root}),
           400, "bind param failed")
    assert await table_counts(db, api.svc) == before


async def test_comment_on_external_object_id(api):
    external = 987654321  # callers comment on their own objects; the original allows it
    cid = await api.comment(external)
    comments = (await api.ok("GET", "/comments/getinfo", {"post_id": external, "root_comment_id": 0}))["comments"]
    assert [c["id"] for c in comments] == [cid]


async def test_update_comment(api):
    post_id = await api.publish()
    cid = await api.comment(post_id, "u1", "before")
    expect(await api.call("PUT", "/comments/update", {"comment_id": cid, "user_id": "u2"}, data={"content": "x"}),
           10014)
    expect(await api.call("PUT", "/comments/update", {"comment_id": cid, "user_id": "u1"}), 10016)
    expect(await api.call("PUT", "/comments/update", {"comment_id": 5, "user_id": "u1"}, data={"content": "x"}), 10006)
    await api.ok("PUT", "/comments/update", {"comment_id": cid, "user_id": "u1"},
                 data={"content": "after", "extra": '{"edited":true}'})
    c = (await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0}))["comments"][0]
    assert (c["content"], c["extra"]) == ("after", {"edited": True})


async def test_delete_root_comment_takes_its_thread(api, db):
    post_id = await api.publish()
    root, keep = await api.comment(post_id, "u1"), await api.comment(post_id, "u5")
    r1 = await api.reply(post_id, root, root)
    await api.reply(post_id, root, r1)
    keep_reply = await api.reply(post_id, keep, keep)
    expect(await api.call("DELETE", "/comments/delete", {"comment_id": root, "user_id": "u2"}), 10014)
    await api.ok("PUT", "/comments/like", {"post_id": post_id, "comment_id": r1, "user_id": "fan"}, json={"like": True})
    assert (await api.ok("GET", "/comments/getlike", {"comment_ids": f"{r1},{keep}"}))["likes"] == [1, 0]
    await api.ok("DELETE", "/comments/delete", {"comment_id": root, "user_id": "u1"})
    assert (await api.ok("GET", "/comments/getlike", {"comment_ids": f"{r1},{keep}"}))["likes"] == [0, 0]
    left = await db.fetch(f'SELECT id FROM "{api.svc}_post_comment_info" WHERE post_id = $1', post_id)
    assert sorted(r["id"] for r in left) == sorted([keep, keep_reply])
    expect(await api.call("DELETE", "/comments/delete", {"comment_id": root, "user_id": "u1"}), 10006)


async def test_delete_reply_takes_its_subtree_only(api, db):
    post_id = await api.publish()
    root = await api.comment(post_id, "u1")
    a = await api.reply(post_id, root, root, "ua")
    a1 = await api.reply(post_id, root, a, "ub")
    await api.reply(post_id, root, a1, "uc")
    b = await api.reply(post_id, root, root, "ud")
    await api.ok("DELETE", "/comments/delete", {"comment_id": a, "user_id": "ua"})
    left = await db.fetch(f'SELECT id FROM "{api.svc}_post_comment_info" WHERE post_id = $1', post_id)
    assert sorted(r["id"] for r in left) == sorted([root, b])
    roots = (await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0}))["comments"]
    assert roots[0]["child_num"] == 1
